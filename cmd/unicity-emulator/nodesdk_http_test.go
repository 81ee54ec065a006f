package main

import (
	"bytes"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/certcodec"
)

// TestNodeSDKHTTP provisions through the emulator's HTTPS endpoint (DPS's REST API) with
// Microsoft's Node.js SDK and its HTTP transport, azure-iot-provisioning-device-http (version
// pinned by the lock file), with an X.509 certificate and with a symmetric key, over verified
// TLS; a wrong key is refused.
func TestNodeSDKHTTP(t *testing.T) {
	node, sdk := nodeSDK(t)
	dir := initDir(t)
	s := serve(t, dir, "--hubs", "2", "--retry-after", "1")
	_, port, err := net.SplitHostPort(s.DPS)
	require.NoError(t, err)

	// provision runs the script for regID with the given credential variables.
	provision := func(t *testing.T, regID string, credentials ...string) (map[string]any, string, error) {
		cmd := exec.CommandContext(testContext(t), node, "provision-http.js")
		cmd.Dir = sdk
		cmd.Env = append(os.Environ(), append([]string{
			"NODE_EXTRA_CA_CERTS=" + s.TrustBundle,
			"DPS_HOST=localhost", "DPS_PORT=" + port, "ID_SCOPE=" + s.IDScope, "REGISTRATION_ID=" + regID,
		}, credentials...)...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var out map[string]any
		if err == nil {
			require.NoError(t, json.Unmarshal(stdout.Bytes(), &out), "stdout: %s\nstderr: %s", stdout.String(), stderr.String())
		}
		return out, stderr.String(), err
	}
	// registered checks that DPS's assignment reached a hub, with the device's credential.
	registered := func(t *testing.T, regID, auth string) {
		var devices []deviceJSON
		cliJSON(t, &devices, "devices", "--dir", dir)
		for _, d := range devices {
			if d.ID == regID {
				assert.Contains(t, d.Auth, auth)
				return
			}
		}
		t.Errorf("device %s not registered at any hub: %+v", regID, devices)
	}

	t.Run("x509", func(t *testing.T) {
		const regID = "node-http-x509"
		dev := newDevice(t, dir, regID)
		keyFile := filepath.Join(t.TempDir(), "device.key")
		require.NoError(t, certcodec.WritePrivateKey(keyFile, dev.cert.PrivateKey.(crypto.Signer)))
		out, stderr, err := provision(t, regID, "CERT_FILE="+dev.chainFile, "KEY_FILE="+keyFile)
		require.NoError(t, err, stderr)
		assert.Equal(t, "assigned", out["status"])
		assert.Contains(t, s.Hubs, out["assignedHub"])
		assert.Equal(t, regID, out["deviceId"])
		assert.Equal(t, "initialAssignment", out["substatus"])
		registered(t, regID, "x509-ca")
	})
	t.Run("symmetric key", func(t *testing.T) {
		const regID = "node-http-sas"
		key := base64.StdEncoding.EncodeToString([]byte("node http device key, 32 bytes!!"))
		var enrolled map[string]any
		cliJSON(t, &enrolled, "enroll", "--dir", dir, "--registration-id", regID, "--symmetric-key", key)
		out, stderr, err := provision(t, regID, "SYMMETRIC_KEY="+key)
		require.NoError(t, err, stderr)
		assert.Equal(t, "assigned", out["status"])
		assert.Contains(t, s.Hubs, out["assignedHub"])
		assert.Equal(t, regID, out["deviceId"])
		registered(t, regID, "sas")

		_, stderr, err = provision(t, regID, "SYMMETRIC_KEY="+base64.StdEncoding.EncodeToString([]byte("not the enrolled key")))
		require.Error(t, err, "a wrong key is refused")
		assert.Contains(t, stderr, "status 401")
	})
}
