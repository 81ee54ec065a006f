package localapi

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/unicity-iot/unicity/config"
)

// SocketName is the socket's name in the runtime directory.
const SocketName = "api.sock"

// ErrNotRunning: no agent answers on the local API socket.
var ErrNotRunning = errors.New("the unicity service is not running")

// Socket is the socket's path for cfg.
func Socket(cfg *config.Config) string { return filepath.Join(cfg.Runtime.Dir, SocketName) }

// Listen opens the local API socket (mode 0660, group from [api] group). A socket left by
// an agent that died is replaced; one that answers belongs to a running agent and is an error.
func Listen(cfg *config.Config) (net.Listener, error) {
	path := Socket(cfg)
	if err := os.MkdirAll(cfg.Runtime.Dir, 0o755); err != nil {
		return nil, &config.Error{File: cfg.Path, Key: "runtime.dir", Err: fmt.Errorf("cannot create the runtime directory: %w", err)}
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s: another unicity agent is serving it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cannot remove the stale API socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		err = fmt.Errorf("cannot listen on the API socket: %w", err)
		if errors.Is(err, os.ErrPermission) {
			return nil, &config.Error{File: cfg.Path, Key: "runtime.dir", Err: err}
		}
		return nil, err
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("cannot set the API socket's mode: %w", err)
	}
	gid, err := cfg.APIGroupID()
	if err != nil {
		ln.Close()
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("cannot give the API socket to group %s: %w", cfg.API.Group, err)
		}
	}
	return ln, nil
}
