package reliability_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/localapi"
)

// TestHelperAPIClient is not a test: run as another user by TestLocalAPIAccess, it asks the
// agent's socket for its status and prints the HTTP status or the error.
func TestHelperAPIClient(t *testing.T) {
	sock := os.Getenv("UNICITY_HELPER_API_SOCKET")
	if sock == "" {
		t.Skip("helper process only")
	}
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}, Timeout: 10 * time.Second}
	resp, err := c.Get("http://unicity/v1/status")
	if err != nil {
		fmt.Printf("error=%v\n", err)
		return
	}
	resp.Body.Close()
	fmt.Printf("status=%d\n", resp.StatusCode)
}

// TestLocalAPIAccess runs the real agent with [api] group set and checks who gets in: the
// socket is 0660, owned by the service's user and the configured group; a process of that
// group (primary or supplementary) is served, any other user is refused by the kernel.
func TestLocalAPIAccess(t *testing.T) {
	if os.Geteuid() != 0 {
		if strict() {
			t.Fatal("needs root to run processes as other users")
		}
		t.Skip("needs root to run processes as other users")
	}
	grp, err := user.LookupGroup("nogroup")
	require.NoError(t, err)
	gid, _ := strconv.Atoi(grp.Gid)

	e := startEmulator(t)
	g := x509Gateway(t, e, "gw-api", "\n[api]\ngroup = \"nogroup\"\n")
	// Other users must be able to reach the socket's directory for the socket's own mode
	// to be what decides.
	for d := g.dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	exe, err := os.Executable()
	require.NoError(t, err)
	helper := filepath.Join(g.dir, "helper")
	data, err := os.ReadFile(exe)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(helper, data, 0o755))

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	agent, _, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)

	sock := filepath.Join(g.run, localapi.SocketName)
	fi, err := os.Stat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o660), fi.Mode().Perm())
	st := fi.Sys().(*syscall.Stat_t)
	assert.Equal(t, uint32(0), st.Uid, "owned by the service's user")
	assert.Equal(t, uint32(gid), st.Gid, "owned by [api] group")

	tests := []struct {
		name string
		cred *syscall.Credential
		want string
	}{
		{"the service's user", nil, "status=200"},
		{"a member of the group (primary)", &syscall.Credential{Uid: 4241, Gid: uint32(gid)}, "status=200"},
		{"a member of the group (supplementary)", &syscall.Credential{Uid: 4242, Gid: 4242, Groups: []uint32{uint32(gid)}}, "status=200"},
		{"another user", &syscall.Credential{Uid: 4243, Gid: 4243}, "permission denied"},
		{"nobody", &syscall.Credential{Uid: 65534, Gid: 4244}, "permission denied"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(helper, "-test.run=^TestHelperAPIClient$", "-test.v")
			cmd.Env = append(os.Environ(), "UNICITY_HELPER_API_SOCKET="+sock)
			cmd.Dir = g.dir
			if tt.cred != nil {
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: tt.cred}
			}
			out, err := cmd.CombinedOutput()
			require.NoError(t, err, "%s", out)
			assert.Contains(t, string(out), tt.want)
		})
	}

	// Oversized and malformed requests get a clear answer and leave the agent serving.
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}, Timeout: 10 * time.Second}
	for _, r := range []struct {
		body   string
		status int
		reason string
	}{
		{`{"payload":`, 400, "invalid JSON body"},
		{`{"payload":1,"unknown":2}`, 400, "unknown field"},
		{`{"payload_base64":"` + strings.Repeat("A", 4<<20) + `"}`, 413, "exceeds"},
	} {
		resp, err := c.Post("http://unicity/v1/telemetry", "application/json", strings.NewReader(r.body))
		require.NoError(t, err)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, r.status, resp.StatusCode, "%s", b)
		assert.Contains(t, string(b), r.reason)
	}
	big := strings.Repeat("x", 2<<20)
	req, _ := http.NewRequest("GET", "http://unicity/v1/status", nil)
	req.Header.Set("X-Big", big)
	if resp, err := c.Do(req); err == nil {
		assert.Equal(t, http.StatusRequestHeaderFieldsTooLarge, resp.StatusCode, "headers are size-limited")
		resp.Body.Close()
	}
	resp, err := c.Get("http://unicity/v1/status")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, 200, resp.StatusCode, "still serving")
}
