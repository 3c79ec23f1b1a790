// Helpers shared by the suites: start one fresh pysnap daemon and dial it the way containerd does.
package gosuite_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const (
	maxMsg       = 16 << 20
	startTimeout = 30 * time.Second
	stopTimeout  = 10 * time.Second
)

func pysnapBin(t *testing.T) string {
	bin := os.Getenv("PYSNAP_BIN")
	if bin == "" {
		t.Fatal("PYSNAP_BIN is not set (path of the pysnap console script)")
	}
	return bin
}

// startPysnap starts `pysnap serve <daemon>` on root, with its socket next to root, and dials it
// with containerd's proxy message limits. The returned close func is idempotent; it logs the
// daemon's output.
func startPysnap(ctx context.Context, bin, daemon, root string) (*grpc.ClientConn, func() error, error) {
	sock := filepath.Join(filepath.Dir(root), "pysnap.sock")
	var out bytes.Buffer // written by exec's copier; read only once the process was waited for
	cmd := exec.Command(bin, "serve", daemon, "--root", root, "--address", sock)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = stopTimeout // do not hang on output pipes kept open by stray children
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()

	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(stopTimeout):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("pysnap did not exit within %v of SIGTERM; killed\n%s", stopTimeout, out.String())
		}
		for _, line := range strings.Split(strings.TrimRight(out.String(), "\n"), "\n") {
			if line != "" {
				log.G(ctx).Info("pysnap| " + line)
			}
		}
		if waitErr != nil {
			return fmt.Errorf("pysnap exited with %v", waitErr)
		}
		return nil
	}

	if err := waitForSocket(sock, exited); err != nil {
		stopErr := stop()
		return nil, nil, fmt.Errorf("%w (stop: %v)\n%s", err, stopErr, out.String())
	}
	conn, err := grpc.NewClient("unix://"+sock,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsg), grpc.MaxCallSendMsgSize(maxMsg)))
	if err != nil {
		_ = stop()
		return nil, nil, fmt.Errorf("grpc client for %s: %w", sock, err)
	}

	var once sync.Once
	var closeErr error
	closeFn := func() error {
		once.Do(func() {
			connErr := conn.Close()
			closeErr = stop()
			if closeErr == nil {
				closeErr = connErr
			}
		})
		return closeErr
	}
	return conn, closeFn, nil
}

// waitForSocket polls until sock accepts a connection, the process exits, or startTimeout passes.
func waitForSocket(sock string, exited <-chan struct{}) error {
	deadline := time.Now().Add(startTimeout)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			return c.Close()
		}
		select {
		case <-exited:
			return fmt.Errorf("pysnap exited before %s accepted connections", sock)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not accepting connections after %v: %v", sock, startTimeout, err)
		}
	}
}
