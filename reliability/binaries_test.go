package reliability_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/internal/poll"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds the real unicity and unicity-emulator, as shipped (no cgo), once per test
// binary, and returns the directory holding them.
func binaries(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "unicity-reliability-bin")
		if buildErr != nil {
			return
		}
		for _, pkg := range []string{"unicity", "unicity-emulator"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, pkg), "../cmd/"+pkg)
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
				return
			}
		}
	})
	require.NoError(t, buildErr)
	return binDir
}

// emulator is a running unicity-emulator.
type emulator struct {
	t    *testing.T
	bin  string
	dir  string
	args []string
	cmd  *exec.Cmd
	done chan struct{}
	line struct {
		IDScope     string   `json:"id_scope"`
		DPS         string   `json:"dps"`
		Hubs        []string `json:"hubs"`
		TrustBundle string   `json:"trust_bundle"`
	}
}

// startEmulator runs "unicity-emulator init" in a fresh directory, then serve with args.
func startEmulator(t *testing.T, args ...string) *emulator {
	t.Helper()
	e := &emulator{t: t, bin: filepath.Join(binaries(t), "unicity-emulator"), dir: filepath.Join(t.TempDir(), "emu"), args: args}
	out, err := exec.Command(e.bin, "init", "--dir", e.dir).CombinedOutput()
	require.NoError(t, err, "%s", out)
	e.start()
	t.Cleanup(e.stop)
	return e
}

func (e *emulator) start() {
	e.t.Helper()
	args := append([]string{"serve", "--dir", e.dir}, e.args...)
	if e.line.DPS != "" { // a restart keeps the addresses the agent knows
		args = append(args, "--dps-addr", e.line.DPS, "--hub-addr", e.line.Hubs[0])
	}
	e.cmd = exec.Command(e.bin, args...)
	stdout, err := e.cmd.StdoutPipe()
	require.NoError(e.t, err)
	require.NoError(e.t, e.cmd.Start())
	e.done = make(chan struct{})
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() {
		e.cmd.Process.Kill()
		e.cmd.Wait()
		e.t.Fatal("unicity-emulator serve printed nothing")
	}
	require.NoError(e.t, json.Unmarshal(lines.Bytes(), &e.line))
	go func() {
		for lines.Scan() {
		}
		e.cmd.Wait()
		close(e.done)
	}()
}

func (e *emulator) stop() {
	if e.cmd == nil {
		return
	}
	e.cmd.Process.Kill()
	<-e.done
	e.cmd = nil
}

// restart kills the emulator, as a crash does (what it keeps on disk survives, operations in
// progress and connections do not), and serves again on the same addresses.
func (e *emulator) restart() {
	e.stop()
	e.start() // Go listeners set SO_REUSEADDR: the ports are free again at once
}

// registrations is how many register requests DPS has had from regID.
func (e *emulator) registrations(t *testing.T, regID string) int {
	t.Helper()
	out, err := exec.Command(e.bin, "registrations", "--dir", e.dir, "--device", regID).Output()
	require.NoError(t, err)
	var r struct{ Count int }
	require.NoError(t, json.Unmarshal(out, &r), "%s", out)
	return r.Count
}

// awaitConnected waits until the hub has a connection from the device.
func (e *emulator) awaitConnected(t *testing.T, deviceID string, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	var out []byte
	err := poll.Until(ctx, 100*time.Millisecond, func() bool {
		var err error
		out, err = exec.Command(e.bin, "devices", "--dir", e.dir).Output()
		require.NoError(t, err)
		var devs []struct {
			ID        string `json:"device_id"`
			Connected bool   `json:"connected"`
		}
		require.NoError(t, json.Unmarshal(out, &devs), "%s", out)
		for _, d := range devs {
			if d.ID == deviceID && d.Connected {
				return true
			}
		}
		return false
	})
	require.NoError(t, err, "%s did not connect within %s: %s", deviceID, timeout, out)
}

// gateway is one device's files: identity, config, state and runtime directories.
type gateway struct {
	dir, config, state, run string
	bin                     string
}

// x509Gateway makes a software-key device (file: key) certified by the emulator's factory CA.
func x509Gateway(t *testing.T, e *emulator, regID string, extra string) *gateway {
	t.Helper()
	ca, err := pki.LoadCA(filepath.Join(e.dir, "factory-ca.pem"), filepath.Join(e.dir, "factory-ca.key"))
	require.NoError(t, err)
	leaf, err := ca.NewDevice(regID)
	require.NoError(t, err)
	g := newGateway(t, e)
	require.NoError(t, certcodec.WriteCertificates(filepath.Join(g.dir, "identity.pem"), leaf.Chain...))
	require.NoError(t, certcodec.WritePrivateKey(filepath.Join(g.dir, "identity.key"), leaf.Key))
	g.writeConfig(t, e, fmt.Sprintf(`
[attestation]
identity_cert = %q
identity_key = "file:%s"
`, filepath.Join(g.dir, "identity.pem"), filepath.Join(g.dir, "identity.key"))+extra)
	return g
}

func newGateway(t *testing.T, e *emulator) *gateway {
	dir := t.TempDir()
	return &gateway{
		dir:    dir,
		config: filepath.Join(dir, "config.toml"),
		state:  filepath.Join(dir, "state"),
		run:    filepath.Join(dir, "run"),
		bin:    filepath.Join(binaries(t), "unicity"),
	}
}

func (g *gateway) writeConfig(t *testing.T, e *emulator, attestation string) {
	cfg := fmt.Sprintf(`
[provisioning]
global_endpoint = %q
id_scope = %q
%s
[tls]
trust_bundle = %q

[state]
dir = %q

[runtime]
dir = %q

[agent]
retry_min = "50ms"
retry_max = "500ms"
`, e.line.DPS, e.line.IDScope, attestation, e.line.TrustBundle, g.state, g.run)
	require.NoError(t, os.WriteFile(g.config, []byte(cfg), 0o600))
}

// policy adds lines to the config's [agent] table.
func (g *gateway) policy(t *testing.T, lines string) {
	b, err := os.ReadFile(g.config)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(g.config, append(b, []byte(lines+"\n")...), 0o600))
}

// command is a unicity process of this gateway.
func (g *gateway) command(ctx context.Context, args ...string) (*exec.Cmd, *bytes.Buffer) {
	cmd := exec.CommandContext(ctx, g.bin, append(args, "--config", g.config)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	return cmd, &out
}

// awaitPhase waits until the agent's status shows phase, or the process exits, or timeout.
func (g *gateway) awaitPhase(t *testing.T, cmd *exec.Cmd, exited <-chan struct{}, phase device.Phase, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last *device.Status
	for time.Now().Before(deadline) {
		if s, err := device.ReadStatus(g.run); err == nil {
			last = s
			if s.Phase == phase {
				return
			}
		}
		select {
		case <-exited:
			t.Fatalf("agent exited before %s", phase)
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("no phase %s after %s (last status %+v)", phase, timeout, last)
}

// runAgent starts "unicity run", returning a channel closed when it exits.
func (g *gateway) runAgent(t *testing.T, ctx context.Context, args ...string) (*exec.Cmd, *bytes.Buffer, <-chan struct{}) {
	cmd, out := g.command(ctx, append([]string{"run"}, args...)...)
	// A status left by an earlier run must not pass for this one's.
	os.Remove(filepath.Join(g.run, device.StatusFileName))
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	return cmd, out, exited
}
