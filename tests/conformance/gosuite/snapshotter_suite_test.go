// Runs containerd 1.7.24's snapshotter conformance suite against `pysnap serve snapshotter`,
// reached through containerd's own gRPC proxy client (the path containerd uses for a proxy plugin).
// Needs root (-test.root): the suite mounts overlayfs.
package gosuite_test

import (
	"context"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
)

func TestSnapshotterSuite(t *testing.T) {
	bin := pysnapBin(t)
	// "overlayfs" tells the suite our directory semantics are overlay's (see semantics.md D1).
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		conn, closeFn, err := startPysnap(ctx, bin, "snapshotter", root)
		if err != nil {
			return nil, nil, err
		}
		return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "pysnap"), closeFn, nil
	})
}
