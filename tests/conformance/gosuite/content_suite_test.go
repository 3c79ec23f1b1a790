// Runs containerd 1.7.24's content store conformance suite against `pysnap serve content`:
//   - TestContentSuite: directly through containerd's content proxy client;
//   - TestContentThroughMetadata: through containerd's metadata layer wrapping that proxy, as
//     containerd itself uses a content proxy plugin (this adds the cross-namespace suites).
package gosuite_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/content/proxy"
	"github.com/containerd/containerd/content/testsuite"
	"github.com/containerd/containerd/labels"
	"github.com/containerd/containerd/metadata"
	"github.com/containerd/containerd/namespaces"
	bolt "go.etcd.io/bbolt"
)

func TestContentSuite(t *testing.T) {
	bin := pysnapBin(t)
	testsuite.ContentSuite(t, "pysnap", func(ctx context.Context, root string) (context.Context, content.Store, func() error, error) {
		conn, closeFn, err := startPysnap(ctx, bin, "content", filepath.Join(root, "store"))
		if err != nil {
			return nil, nil, nil, err
		}
		return ctx, proxy.NewContentStore(contentapi.NewContentClient(conn)), closeFn, nil
	})
}

// viaMetadata puts containerd's bolt metadata layer (with the given policy) in front of pysnap.
func viaMetadata(bin string, opts ...metadata.DBOpt) testsuite.StoreInitFn {
	return func(ctx context.Context, root string) (context.Context, content.Store, func() error, error) {
		conn, closePysnap, err := startPysnap(ctx, bin, "content", filepath.Join(root, "store"))
		if err != nil {
			return nil, nil, nil, err
		}
		db, err := bolt.Open(filepath.Join(root, "metadata.db"), 0o600, nil)
		if err != nil {
			closePysnap()
			return nil, nil, nil, err
		}
		var count uint64
		name := testsuite.Name(ctx)
		ctx = testsuite.SetContextWrapper(ctx, func(ctx context.Context, shared bool) (context.Context, func(context.Context) error, error) {
			nsCtx := namespaces.WithNamespace(ctx, fmt.Sprintf("%s-ns%d", name, atomic.AddUint64(&count, 1)))
			if shared {
				err := db.Update(func(tx *bolt.Tx) error {
					ns, err := namespaces.NamespaceRequired(nsCtx)
					if err != nil {
						return err
					}
					return metadata.NewNamespaceStore(tx).SetLabel(nsCtx, ns, labels.LabelSharedNamespace, "true")
				})
				if err != nil {
					return nil, nil, err
				}
			}
			return nsCtx, func(context.Context) error { return nil }, nil
		})
		backend := proxy.NewContentStore(contentapi.NewContentClient(conn))
		closeAll := func() error {
			dbErr := db.Close()
			if err := closePysnap(); err != nil {
				return err
			}
			return dbErr
		}
		return ctx, metadata.NewDB(db, backend, nil, opts...).ContentStore(), closeAll, nil
	}
}

func TestContentThroughMetadata(t *testing.T) {
	bin := pysnapBin(t)
	testsuite.ContentSuite(t, "metadata", viaMetadata(bin))
	testsuite.ContentCrossNSSharedSuite(t, "metadata", viaMetadata(bin))
	testsuite.ContentCrossNSIsolatedSuite(t, "metadata", viaMetadata(bin, metadata.WithPolicyIsolated))
	testsuite.ContentSharedNSIsolatedSuite(t, "metadata", viaMetadata(bin, metadata.WithPolicyIsolated))
}
