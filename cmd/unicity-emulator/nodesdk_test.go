package main

import (
	"bufio"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/poll"
)

// nodeSDKDir holds the pinned Node.js SDK check: package.json, package-lock.json and the
// script. node_modules is installed into a cache directory, never here.
const nodeSDKDir = "testdata/nodesdk"

// needTool returns a tool's path, or skips the test without it unless UNICITY_TEST_STRICT=1.
func needTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		skipOrFail(t, "%s not found: %v", name, err)
	}
	return path
}

func skipOrFail(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("UNICITY_TEST_STRICT") == "1" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

// installNodeSDK runs npm ci once per lock file into the user cache and returns the
// directory with node_modules and the script.
func installNodeSDK(t *testing.T, npm string) string {
	t.Helper()
	h := sha256.New()
	files := []string{"package.json", "package-lock.json", "common.js", "provision.js", "restart.js", "provision-http.js"}
	for _, f := range files {
		data, err := os.ReadFile(filepath.Join(nodeSDKDir, f))
		require.NoError(t, err)
		h.Write(data)
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "unicity", "nodesdk-"+hex.EncodeToString(h.Sum(nil))[:16])
	if _, err := os.Stat(filepath.Join(dir, "node_modules", ".package-lock.json")); err == nil {
		return dir
	}
	// Install beside the final place and rename, so that an interrupted install is never
	// taken for a complete one.
	require.NoError(t, os.MkdirAll(filepath.Dir(dir), 0o755))
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".nodesdk-*")
	require.NoError(t, err)
	defer os.RemoveAll(tmp)
	for _, f := range files {
		data, err := os.ReadFile(filepath.Join(nodeSDKDir, f))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(tmp, f), data, 0o644))
	}
	cmd := exec.CommandContext(testContext(t), npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts")
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		skipOrFail(t, "npm ci: %v\n%s", err, out)
	}
	if err := os.Rename(tmp, dir); err != nil && !os.IsExist(err) {
		require.DirExists(t, dir, "rename: %v", err) // another test process may have won the race
	}
	return dir
}

// nodeSDK returns node and the directory the pinned SDKs are installed in, or skips.
func nodeSDK(t *testing.T) (node, sdk string) {
	t.Helper()
	node = needTool(t, "node")
	return node, installNodeSDK(t, needTool(t, "npm"))
}

// TestNodeSDK runs Microsoft's Node.js device SDKs (versions pinned by the lock file)
// against the emulator: X.509 registration with DPS, assignment, hub connection, telemetry,
// a reported-property update, then a C2D message, a direct method and a desired-property
// patch from the operator commands, all over verified TLS.
func TestNodeSDK(t *testing.T) {
	node, sdk := nodeSDK(t)
	dir := initDir(t)
	s := serve(t, dir, "--hubs", "2", "--retry-after", "1")

	const regID = "node-gw-1"
	dev := newDevice(t, dir, regID)
	n := startNode(t, node, sdk, "provision.js", s, dev)
	// next returns the script's next event, or false after within; the script ending
	// before the test has seen "done" fails the test.
	next := func(within time.Duration) (map[string]any, bool) {
		select {
		case ev, ok := <-n.events:
			if !ok {
				t.Fatalf("node provision.js ended early (%v):\n%s", <-n.exited, n.stderr.String())
			}
			return ev, true
		case <-time.After(within):
			return nil, false
		}
	}

	// Provisioned, connected, telemetry sent and the reported twin updated.
	ready, ok := next(30 * time.Second)
	require.True(t, ok, "no ready event:\n%s", n.stderr.String())
	require.Equal(t, "ready", ready["event"])
	assert.Contains(t, s.Hubs, ready["assignedHub"])
	assert.Equal(t, regID, ready["deviceId"])
	assert.Equal(t, "initialAssignment", ready["substatus"])

	var tel []telemetryJSON
	cliJSON(t, &tel, "telemetry", "--dir", dir, "--device", regID, "--wait", "1")
	require.Len(t, tel, 1)
	assert.Equal(t, ready["assignedHub"], tel[0].Hub)
	assert.JSONEq(t, `{"temperature":21.5}`, tel[0].Payload)
	assert.Equal(t, "node sdk", tel[0].Properties["source"])
	assert.Equal(t, "application/json", tel[0].System["$.ct"])
	assert.Equal(t, "utf-8", tel[0].System["$.ce"])
	assert.Equal(t, "node-1", tel[0].System["$.mid"])

	var twin struct {
		Reported map[string]any `json:"reported"`
	}
	cliJSON(t, &twin, "twin", "--dir", dir, "--device", regID)
	assert.Equal(t, "azure-iot-device", twin.Reported["sdk"])
	assert.Equal(t, map[string]any{"version": "1.0.0"}, twin.Reported["firmware"])
	assert.Equal(t, float64(2), twin.Reported["$version"])

	var devices []deviceJSON
	cliJSON(t, &devices, "devices", "--dir", dir)
	require.Len(t, devices, 1)
	assert.Contains(t, devices[0].ClientType, "azure-iot-device", "the SDK's user agent is recorded")

	// The cloud side. The SDK subscribes in the background, so a method call may find the
	// device not yet subscribed and a desired patch may go unnoticed: both are retried. A
	// C2D message waits in the queue for the subscription.
	got := map[string]map[string]any{}
	var sent map[string]string
	cliJSON(t, &sent, "c2d", "--dir", dir, "--device", regID, "--payload", "hello node", "--property", "prio=high")
	var method struct {
		Status  int            `json:"status"`
		Payload map[string]any `json:"payload"`
	}
	invoked := poll.Until(testContext(t), 100*time.Millisecond, func() bool {
		stdout, code := runCLI(t, "invoke", "--dir", dir, "--device", regID, "--method", "reboot", "--payload", `{"delay":1}`, "--timeout", "5s")
		if code != 0 {
			return false
		}
		require.NoError(t, json.Unmarshal([]byte(stdout), &method))
		return true
	})
	require.NoError(t, invoked, "the device never took the method call")
	assert.Equal(t, 200, method.Status)
	assert.Equal(t, map[string]any{"rebooting": true, "request": map[string]any{"delay": float64(1)}}, method.Payload)
	for marker := 1; got["desired"] == nil; marker++ {
		require.Less(t, marker, 30, "the device never saw a desired patch")
		var tw map[string]any
		cliJSON(t, &tw, "twin", "--dir", dir, "--device", regID, "--desired", fmt.Sprintf(`{"marker":%d}`, marker))
		for wait := 500 * time.Millisecond; got["done"] == nil; wait = 100 * time.Millisecond {
			ev, ok := next(wait)
			if !ok {
				break
			}
			got[ev["event"].(string)] = ev
		}
	}
	for got["c2d"] == nil || got["method"] == nil || got["done"] == nil {
		ev, ok := next(30 * time.Second)
		require.True(t, ok, "events so far: %v\n%s", got, n.stderr.String())
		got[ev["event"].(string)] = ev
	}
	assert.Equal(t, "hello node", got["c2d"]["payload"])
	assert.Equal(t, sent["message_id"], got["c2d"]["messageId"])
	assert.Equal(t, "high", got["c2d"]["properties"].(map[string]any)["prio"])
	assert.Equal(t, map[string]any{"delay": float64(1)}, got["method"]["payload"])
	assert.NotNil(t, got["desired"]["version"])
	require.NoError(t, <-n.exited, n.stderr.String())

	var pending []deviceJSON
	cliJSON(t, &pending, "devices", "--dir", dir)
	assert.Equal(t, 0, pending[0].PendingC2D, "the SDK completed the message")
}

// nodeScript runs one of the scripts in nodeSDKDir for device regID of the emulator s and
// returns its events, the pipe to its stdin and its exit.
type nodeScript struct {
	t      *testing.T
	events chan map[string]any
	exited chan error
	stdin  io.WriteCloser
	stderr *syncBuffer
}

func startNode(t *testing.T, node, sdk, script string, s serveLine, dev device) *nodeScript {
	t.Helper()
	keyFile := filepath.Join(t.TempDir(), "device.key")
	require.NoError(t, certcodec.WritePrivateKey(keyFile, dev.cert.PrivateKey.(crypto.Signer)))
	dpsHost := "localhost:" + s.DPS[strings.LastIndex(s.DPS, ":")+1:]
	cmd := exec.CommandContext(testContext(t), node, script)
	cmd.Dir = sdk
	cmd.Env = append(os.Environ(),
		"NODE_EXTRA_CA_CERTS="+s.TrustBundle,
		"DPS_HOST="+dpsHost, "ID_SCOPE="+s.IDScope, "REGISTRATION_ID="+dev.id,
		"CERT_FILE="+dev.chainFile, "KEY_FILE="+keyFile)
	n := &nodeScript{t: t, events: make(chan map[string]any, 10), exited: make(chan error, 1), stderr: &syncBuffer{}}
	cmd.Stderr = n.stderr
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	n.stdin, err = cmd.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	go func() {
		lines := bufio.NewScanner(stdout)
		for lines.Scan() {
			var ev map[string]any
			if json.Unmarshal(lines.Bytes(), &ev) == nil {
				n.events <- ev
			}
		}
		close(n.events)
		n.exited <- cmd.Wait()
	}()
	return n
}

// next returns the script's next event, which must be want, within 60 s.
func (n *nodeScript) next(want string) map[string]any {
	n.t.Helper()
	select {
	case ev, ok := <-n.events:
		if !ok {
			n.t.Fatalf("node ended early (%v):\n%s", <-n.exited, n.stderr.String())
		}
		require.Equal(n.t, want, ev["event"], "%v\n%s", ev, n.stderr.String())
		return ev
	case <-time.After(60 * time.Second):
		n.t.Fatalf("no %s event:\n%s", want, n.stderr.String())
		return nil
	}
}

func (n *nodeScript) command(c string) {
	n.t.Helper()
	_, err := io.WriteString(n.stdin, c+"\n")
	require.NoError(n.t, err)
}

// emulatorProcess is 'unicity-emulator serve' run as a program, so that it can be killed.
type emulatorProcess struct {
	cmd  *exec.Cmd
	line serveLine
}

func startEmulatorProcess(t *testing.T, dir string, args ...string) *emulatorProcess {
	t.Helper()
	bin, err := exec.LookPath("unicity-emulator") // put on PATH by TestMain
	require.NoError(t, err)
	cmd := exec.Command(bin, append([]string{"serve", "--dir", dir}, args...)...)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &emulatorProcess{cmd: cmd}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err, "serve printed no line")
	require.NoError(t, json.Unmarshal([]byte(line), &p.line), line)
	go io.Copy(io.Discard, stdout)
	return p
}

// kill ends the emulator as a crash or a power cut would: SIGKILL, nothing tidied up.
func (p *emulatorProcess) kill(t *testing.T) {
	t.Helper()
	require.NoError(t, p.cmd.Process.Kill())
	p.cmd.Wait()
}

// TestNodeSDKRestart: Microsoft's Node.js SDK rides out an emulator killed with SIGKILL and
// started again on the same directory, as it would an Azure outage: it reconnects to the
// hub it was assigned, without going back to DPS; the cloud-to-device message queued before
// the crash arrives; its twin keeps its version.
func TestNodeSDKRestart(t *testing.T) {
	node, sdk := nodeSDK(t)
	dir := initDir(t)
	first := startEmulatorProcess(t, dir)
	const regID = "node-restart-1"
	dev := newDevice(t, dir, regID)
	n := startNode(t, node, sdk, "restart.js", first.line, dev)
	ready := n.next("ready")
	assert.Equal(t, first.line.Hub, ready["assignedHub"], "a hub name without a port")
	assert.NotContains(t, ready["assignedHub"], ":")

	var twin struct {
		Reported map[string]any `json:"reported"`
	}
	cliJSON(t, &twin, "twin", "--dir", dir, "--device", regID)
	require.Equal(t, "before", twin.Reported["phase"])
	version := twin.Reported["$version"]
	var sent map[string]string
	cliJSON(t, &sent, "c2d", "--dir", dir, "--device", regID, "--payload", "queued before the crash")
	var devices []deviceJSON
	cliJSON(t, &devices, "devices", "--dir", dir)
	require.Len(t, devices, 1)
	require.True(t, devices[0].Connected)
	require.Equal(t, 1, devices[0].PendingC2D, "not subscribed yet: the message waits")

	first.kill(t)
	second := startEmulatorProcess(t, dir)
	assert.Equal(t, first.line.Hubs, second.line.Hubs)
	// The emulator says nothing when a device connects: ask it.
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	err := poll.Until(ctx, 200*time.Millisecond, func() bool {
		cliJSON(t, &devices, "devices", "--dir", dir)
		return len(devices) == 1 && devices[0].Connected
	})
	require.NoError(t, err, "the SDK did not reconnect: %+v\n%s", devices, n.stderr.String())
	assert.Equal(t, 1, devices[0].PendingC2D, "the message survived the crash")

	n.command("listen")
	c2d := n.next("c2d")
	assert.Equal(t, "queued before the crash", c2d["payload"])
	assert.Equal(t, sent["message_id"], c2d["messageId"])

	n.command("twin")
	tw := n.next("twin")
	assert.Equal(t, version, tw["reportedVersion"], "the twin kept its version")
	assert.Equal(t, version.(float64)+1, tw["afterUpdate"])

	var res struct {
		Status int `json:"status"`
	}
	cliJSON(t, &res, "invoke", "--dir", dir, "--device", regID, "--method", "ping", "--timeout", "10s")
	assert.Equal(t, 200, res.Status, "the method subscription survived too")

	var regs registrationsJSON
	cliJSON(t, &regs, "registrations", "--dir", dir, "--device", regID)
	assert.Equal(t, 1, regs.Count, "no DPS call after the restart")

	n.command("done")
	n.next("done")
	require.NoError(t, <-n.exited, n.stderr.String())
}
