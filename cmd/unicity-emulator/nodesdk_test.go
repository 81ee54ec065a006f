package main

import (
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/pki"
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
	files := []string{"package.json", "package-lock.json", "provision.js"}
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

// TestNodeSDK runs Microsoft's Node.js device SDKs (versions pinned by the lock file)
// against the emulator: X.509 registration with DPS, assignment, hub connection, telemetry
// and a reported-property update, all over verified TLS.
func TestNodeSDK(t *testing.T) {
	node := needTool(t, "node")
	npm := needTool(t, "npm")
	sdk := installNodeSDK(t, npm)

	dir := filepath.Join(t.TempDir(), "emu")
	_, code := cli(t, "init", "--dir", dir)
	require.Equal(t, 0, code)
	s := serve(t, dir, "--hubs", "2", "--retry-after", "1")

	const regID = "node-gw-1"
	dev := newDevice(t, dir, regID)
	keyFile := filepath.Join(t.TempDir(), "device.key")
	require.NoError(t, pki.WritePrivateKey(keyFile, dev.cert.PrivateKey.(crypto.Signer)))

	dpsHost := "localhost:" + s.DPS[strings.LastIndex(s.DPS, ":")+1:]
	cmd := exec.CommandContext(testContext(t), node, "provision.js")
	cmd.Dir = sdk
	cmd.Env = append(os.Environ(),
		"NODE_EXTRA_CA_CERTS="+s.TrustBundle,
		"DPS_HOST="+dpsHost, "ID_SCOPE="+s.IDScope, "REGISTRATION_ID="+regID,
		"CERT_FILE="+dev.chainFile, "KEY_FILE="+keyFile)
	out, err := cmd.Output()
	var stderr []byte
	if ee, ok := err.(*exec.ExitError); ok {
		stderr = ee.Stderr
	}
	require.NoError(t, err, "node provision.js:\n%s%s", out, stderr)

	var got struct {
		AssignedHub string `json:"assignedHub"`
		DeviceID    string `json:"deviceId"`
		Substatus   string `json:"substatus"`
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &got), "%s", out)
	assert.Contains(t, s.Hubs, got.AssignedHub)
	assert.Equal(t, regID, got.DeviceID)
	assert.Equal(t, "initialAssignment", got.Substatus)

	var tel []telemetryJSON
	cliJSON(t, &tel, "telemetry", "--dir", dir, "--device", regID, "--wait", "1")
	require.Len(t, tel, 1)
	assert.Equal(t, got.AssignedHub, tel[0].Hub)
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
}
