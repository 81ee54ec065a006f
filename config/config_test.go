package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/spool"
	"github.com/unicity-iot/unicity/telemetry"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.toml")
	require.NoError(t, os.WriteFile(path, []byte(body), 0o600))
	return path
}

func TestExampleConfigDecodesToDefaults(t *testing.T) {
	cfg, err := Load("testdata/config.example.toml")
	require.NoError(t, err)
	want := Default()
	want.Provisioning.IDScope = "0ne00000000"
	want.Path = "testdata/config.example.toml"
	assert.Equal(t, &want, cfg)
}

func TestLoadConfigValues(t *testing.T) {
	cfg, err := Load(writeConfig(t, `
[provisioning]
global_endpoint = "127.0.0.1:8883"
id_scope = "0ne0012ABCD"
registration_id = "gw-0001"
transport = "mqtt-ws"
payload = '{"modelId":"dtmi:com:example:gw;1"}'
proxy = "http://proxy.example:3128"

[attestation]
identity_cert = "tpm-nv:0x01c0000a"
identity_key = "tpmkey:handle=0x81000002"

[tpm]
device = "swtpm:127.0.0.1:2321"

[state]
dir = "/tmp/state"

[agent]
first_boot_delay = "2m"
parked_retry = "30m"
hub_failures = 3
`))
	require.NoError(t, err)
	assert.Equal(t, "127.0.0.1:8883", cfg.Provisioning.GlobalEndpoint)
	assert.Equal(t, "mqtt-ws", cfg.Provisioning.Transport)
	assert.Equal(t, Network{Transport: "mqtt-ws", Proxy: "http://proxy.example:3128"}, cfg.Network(),
		"the hub reads [provisioning] transport and proxy too")
	assert.Equal(t, "tpmkey:handle=0x81000002", cfg.Attestation.IdentityKey)
	assert.Equal(t, "/tmp/state", cfg.State.Dir)
	assert.Equal(t, "/run/unicity", cfg.Runtime.Dir)
	assert.Equal(t, 2*time.Minute, cfg.Agent.FirstBootDelay)
	assert.Equal(t, 30*time.Minute, cfg.Agent.ParkedRetry)
	assert.Equal(t, 10*time.Minute, cfg.Agent.ReprovisionInterval)
	assert.Equal(t, 3, cfg.Agent.HubFailures)
}

// TestTelemetryTable: the queue lives in the state directory unless the file says where, and
// the table's values reach the store's options.
func TestCertificatesTable(t *testing.T) {
	cfg, err := Load(writeConfig(t, "[provisioning]\nid_scope = \"0ne00000000\"\n[certificates]\nissuance = \"dps\"\nkey_type = \"ecdsa-p384\"\n"))
	require.NoError(t, err)
	assert.True(t, cfg.Certificates.Issued())
	assert.Equal(t, attest.ECDSAP384, cfg.Certificates.KeyType)
	assert.False(t, Default().Certificates.Issued(), "issuance is off by default")
	assert.Equal(t, 0.8, cfg.Certificates.RenewAt)
	assert.Equal(t, 0.05, cfg.Certificates.RenewJitter)

	for _, bad := range []string{"renew_at = 1.0", "renew_at = 0.03", "renew_jitter = -0.1", "renew_at = 0.9\nrenew_jitter = 0.1"} {
		_, err := Load(writeConfig(t, "[provisioning]\nid_scope = \"0ne00000000\"\n[certificates]\n"+bad+"\n"))
		var ce *Error
		require.ErrorAs(t, err, &ce, bad)
		assert.Contains(t, err.Error(), "certificates.renew_at", bad)
	}
}

func TestTelemetryTable(t *testing.T) {
	const scope = "[provisioning]\nid_scope = \"0ne00000000\"\n"
	cfg, err := Parse("c.toml", []byte(scope+"[state]\ndir = \"/data/unicity\"\n"))
	require.NoError(t, err)
	assert.Equal(t, telemetry.Options{Dir: "/data/unicity/telemetry", MaxBytes: 16 << 20, MaxAge: 168 * time.Hour, WhenFull: spool.RefuseNew}, cfg.Telemetry)

	cfg, err = Parse("c.toml", []byte(scope+`[state]
dir = "/data/unicity"
[telemetry]
dir = "/data/queue"
max_bytes = 1048576
max_age = "24h"
when_full = "drop-oldest"
`))
	require.NoError(t, err)
	assert.Equal(t, telemetry.Options{Dir: "/data/queue", MaxBytes: 1 << 20, MaxAge: 24 * time.Hour, WhenFull: spool.DropOldest}, cfg.Telemetry)
}

func TestLoadConfigTransports(t *testing.T) {
	for _, transport := range []string{"auto", "mqtt", "mqtt-ws", "https"} {
		cfg, err := Load(writeConfig(t, "[provisioning]\nid_scope = \"0ne00000000\"\ntransport = \""+transport+"\"\n"))
		require.NoError(t, err, transport)
		assert.Equal(t, transport, cfg.Provisioning.Transport)
	}
}

// TestTPMAttestation: method tpm keeps DPS's key at the SDKs' persistent handle unless the file
// names a handle or keyfile, takes the SRK handle, and goes to DPS over HTTPS (auto or https).
func TestTPMAttestation(t *testing.T) {
	const scope = "[provisioning]\nid_scope = \"0ne00000000\"\n"
	cfg, err := Parse("c.toml", []byte(scope+"[attestation]\nmethod = \"tpm\"\n"))
	require.NoError(t, err)
	assert.Equal(t, DefaultTPMIdentityKey, cfg.Attestation.IdentityKey)
	assert.Equal(t, DefaultSRKHandle, cfg.Attestation.SRKHandle)
	assert.Empty(t, cfg.Provisioning.RegistrationID, "the agent derives it from the EK")

	cfg, err = Parse("c.toml", []byte(scope+"transport = \"https\"\n[attestation]\nmethod = \"tpm\"\nsrk_handle = \"0x81000002\"\nidentity_key = \"tpmkey:/var/lib/unicity/dps.key\"\n"))
	require.NoError(t, err)
	assert.Equal(t, "tpmkey:/var/lib/unicity/dps.key", cfg.Attestation.IdentityKey)
	assert.Equal(t, "0x81000002", cfg.Attestation.SRKHandle)
}

func TestLoadConfigMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.toml"))
	require.ErrorIs(t, err, ErrNotExist)
	var ce *Error
	assert.False(t, errors.As(err, &ce), "a missing file is not an invalid one")
}

func TestLoadConfigErrors(t *testing.T) {
	const scope = "[provisioning]\nid_scope = \"0ne00000000\"\n"
	tests := []struct {
		name string
		body string
		line int
		key  string
		msg  string
	}{
		{"unknown key", scope + "id_scop = \"x\"\n", 3, "provisioning.id_scop", "unknown key"},
		{"unknown table", scope + "[tmp]\ndevice = \"x\"\n", 3, "tmp", "unknown key"},
		{"syntax", scope + "transport = \n", 3, "provisioning.transport", "expected value"},
		{"wrong type", scope + "[agent]\nhub_failures = \"ten\"\n", 4, "agent.hub_failures", "incompatible types"},
		{"bad duration", scope + "[agent]\nparked_retry = \"an hour\"\n", 4, "agent.parked_retry", ""},
		{"missing scope", "[provisioning]\n", 0, "provisioning.id_scope", "missing"},
		{"bad scope", "[provisioning]\nid_scope = \"scope/1\"\n", 2, "provisioning.id_scope", "not an ID scope"},
		{"bad transport", scope + "transport = \"amqp\"\n", 3, "provisioning.transport", "\"amqp\" is not one of auto, mqtt, mqtt-ws, https"},
		{"bad payload", scope + "payload = '{\"a\":'\n", 3, "provisioning.payload", "JSON"},
		{"bad proxy", scope + "proxy = \"socks5://x:1\"\n", 3, "provisioning.proxy", "proxy URL"},
		{"endpoint URL", scope + "global_endpoint = \"mqtts://dps\"\n", 3, "provisioning.global_endpoint", "host"},
		{"endpoint port", scope + "global_endpoint = \"dps:99999\"\n", 3, "provisioning.global_endpoint", "port"},
		{"bad regid", scope + "registration_id = \"gw/1\"\n", 3, "provisioning.registration_id", "invalid registration ID"},
		{"bad issuance", scope + "[certificates]\nissuance = \"hub\"\n", 4, "certificates.issuance", "not one of none, dps"},
		{"issuance without x509", "[provisioning]\nid_scope = \"0ne00000000\"\nregistration_id = \"gw-1\"\n[attestation]\nmethod = \"symmetric_key\"\nsymmetric_key = \"/k\"\n[certificates]\nissuance = \"dps\"\n", 8, "certificates.issuance", "needs attestation method"},
		{"bad key type", scope + "[certificates]\nkey_type = \"rsa-2048\"\n", 4, "certificates.key_type", "not one of ecdsa-p256, ecdsa-p384"},
		{"bad method", scope + "[attestation]\nmethod = \"hsm\"\n", 4, "attestation.method", "x509, symmetric_key, tpm"},
		{"tpm over mqtt", scope + "transport = \"mqtt\"\n[attestation]\nmethod = \"tpm\"\n", 3, "provisioning.transport", "HTTPS only"},
		{"tpm over mqtt-ws", scope + "transport = \"mqtt-ws\"\n[attestation]\nmethod = \"tpm\"\n", 3, "provisioning.transport", "HTTPS only"},
		{"tpm software key", scope + "[attestation]\nmethod = \"tpm\"\nidentity_key = \"file:/k.pem\"\n", 5, "attestation.identity_key", "in the TPM"},
		{"tpm relative keyfile", scope + "[attestation]\nmethod = \"tpm\"\nidentity_key = \"tpmkey:k.key\"\n", 5, "attestation.identity_key", "absolute"},
		{"srk handle", scope + "[attestation]\nmethod = \"tpm\"\nsrk_handle = \"0x01000001\"\n", 5, "attestation.srk_handle", "0x81000000 to 0x81FFFFFF"},
		{"key handle range", scope + "[attestation]\nidentity_key = \"tpmkey:handle=0x01000002\"\n", 4, "attestation.identity_key", "0x81000000 to 0x81FFFFFF"},
		{"key handle format", scope + "[attestation]\nidentity_key = \"tpmkey:handle=81000002\"\n", 4, "attestation.identity_key", "persistent handle"},
		{"key source", scope + "[attestation]\nidentity_key = \"pkcs11:foo\"\n", 4, "attestation.identity_key", "unknown key source"},
		{"cert nv handle", scope + "[attestation]\nidentity_cert = \"tpm-nv:0x81000000\"\n", 4, "attestation.identity_cert", "0x01000000 to 0x01FFFFFF"},
		{"symmetric without regid", scope + "[attestation]\nmethod = \"symmetric_key\"\nsymmetric_key = \"/k\"\n", 0, "provisioning.registration_id", "missing"},
		{"group key for x509", scope + "[attestation]\nsymmetric_key_group = true\n", 4, "attestation.symmetric_key_group", "symmetric_key"},
		{"empty swtpm", scope + "[tpm]\ndevice = \"swtpm:\"\n", 4, "tpm.device", "swtpm"},
		{"empty state dir", scope + "[state]\ndir = \"\"\n", 4, "state.dir", "empty"},
		{"retry bounds", scope + "[agent]\nretry_min = \"10s\"\nretry_max = \"1s\"\n", 5, "agent.retry_max", "less than"},
		{"negative delay", scope + "[agent]\nfirst_boot_delay = \"-1s\"\n", 4, "agent.first_boot_delay", "negative"},
		{"hub failures", scope + "[agent]\nhub_failures = 0\n", 4, "agent.hub_failures", "at least 1"},
		{"telemetry policy", scope + "[telemetry]\nwhen_full = \"drop-newest\"\n", 4, "telemetry.when_full", "refuse-new or drop-oldest"},
		{"telemetry size", scope + "[telemetry]\nmax_bytes = 4096\n", 4, "telemetry.max_bytes", "at least 65536"},
		{"telemetry age", scope + "[telemetry]\nmax_age = \"0s\"\n", 4, "telemetry.max_age", "positive"},
		{"telemetry on tmpfs", scope + "[telemetry]\ndir = \"/run/unicity/queue\"\n", 4, "telemetry.dir", "does not survive a reboot"},
		{"telemetry unknown key", scope + "[telemetry]\nmax_messages = 10\n", 4, "telemetry.max_messages", "unknown key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, tt.body)
			_, err := Load(path)
			var ce *Error
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, path, ce.File)
			assert.Equal(t, tt.line, ce.Line, "line of %v", err)
			assert.Equal(t, tt.key, ce.Key)
			assert.Contains(t, err.Error(), path)
			assert.Contains(t, err.Error(), tt.msg)
			assert.NotErrorIs(t, err, ErrNotExist)
		})
	}
}

// TestLoadConfigIsBounded: a file far larger than any configuration is refused after reading
// MaxSize+1 bytes (a 300 MB file once took 6.5 GB to decode).
func TestLoadConfigIsBounded(t *testing.T) {
	path := writeConfig(t, "[provisioning]\nid_scope = \"0ne00000000\"\n")
	require.NoError(t, os.Truncate(path, 300<<20)) // sparse: no disk used
	_, err := Load(path)
	var ce *Error
	require.ErrorAs(t, err, &ce)
	assert.EqualError(t, err, path+": larger than 1 MiB: not a unicity configuration")

	body := "[provisioning]\nid_scope = \"0ne00000000\"\n#"
	_, err = Load(writeConfig(t, body+strings.Repeat("#", MaxSize-len(body))))
	assert.NoError(t, err, "a file of MaxSize is read")
}

// TestConfigErrorsQuoteAnExcerpt: a huge value or key is quoted by its start and end, with
// the reason, never whole.
func TestConfigErrorsQuoteAnExcerpt(t *testing.T) {
	const scope = "[provisioning]\nid_scope = \"0ne00000000\"\n"
	huge := strings.Repeat("A", 900<<10)
	for _, tt := range []struct{ name, body, key, reason string }{
		{"value", scope + "transport = \"" + huge + "é\"\n", "provisioning.transport", `Aé" is not one of auto, mqtt, mqtt-ws`},
		{"key", scope + huge + " = 1\n", "provisioning." + huge, "AAAA: unknown key"},
		{"decoder", scope + "[agent]\nretry_min = \"" + huge + "\"\n", "agent.retry_min", `AAAA"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("c.toml", []byte(tt.body))
			var ce *Error
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, tt.key, ce.Key, "the key itself is whole")
			assert.Less(t, len(err.Error()), 2*wordExcerpt+150, "%.400s", err)
			assert.Contains(t, err.Error(), "bytes left out")
			assert.Contains(t, err.Error(), tt.reason)
			assert.True(t, utf8.ValidString(err.Error()), "cut on rune boundaries")
		})
	}
}
