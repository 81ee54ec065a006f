package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/device/devicetest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

// renewalDevice is a provisioned device with issuance on and the agent stopped: devicetest's
// onboarding identity (software key), and a stored operational certificate past its renewal time whose
// last renewal failed and whose renewed successor waits for the hub.
type renewalDevice struct {
	config             string
	cfg                *config.Config
	operational, trial *pki.Leaf
	state              *storage.State
}

func newRenewalDevice(t *testing.T) *renewalDevice {
	t.Helper()
	tb := devicetest.New(t)
	dir := t.TempDir()
	d := &renewalDevice{config: filepath.Join(dir, "config.toml")}
	require.NoError(t, os.WriteFile(d.config, fmt.Appendf(nil, `
[provisioning]
id_scope = "0ne00000000"
[attestation]
identity_cert = %q
identity_key = %q
[state]
dir = %q
[runtime]
dir = %q
[certificates]
issuance = "dps"
`, tb.Config.Attestation.IdentityCert, tb.Config.Attestation.IdentityKey, filepath.Join(dir, "state"), filepath.Join(dir, "run")), 0o600))
	var err error
	d.cfg, err = config.Load(d.config)
	require.NoError(t, err)
	ca, err := pki.NewRoot("issuing CA")
	require.NoError(t, err)

	t0 := time.Now()
	d.operational, err = ca.NewDevice("gw-0001", pki.WithValidity(t0.Add(-9*24*time.Hour), t0.Add(24*time.Hour)))
	require.NoError(t, err)
	d.trial, err = ca.NewDevice("gw-0001", pki.WithValidity(t0.Add(-time.Hour), t0.Add(10*24*time.Hour)))
	require.NoError(t, err)
	d.state = &storage.State{
		RegistrationID: "gw-0001", Binding: certcodec.Thumbprint(tb.Leaf.Certificate()),
		AssignedHub: "hub-a.example", DeviceID: "gw-0001", ProvisionedAt: t0.Add(-9 * 24 * time.Hour).UTC(),
		IssuedChain:    [][]byte{d.operational.Certificate().Raw},
		OperationalKey: "tpmkey:" + filepath.Join(dir, "state", "operational-A.key"),
		Renewal: &storage.Renewal{IssuedChain: [][]byte{d.trial.Certificate().Raw}, Via: device.ViaDPS,
			OperationalKey: "tpmkey:" + filepath.Join(dir, "state", "operational-B.key"), IssuedAt: t0.Add(-time.Minute).UTC()},
		LastRenewal: &storage.RenewalResult{At: t0.Add(-time.Hour).UTC(), Result: storage.RenewalFailed, Via: device.ViaHub, Error: "the hub answered 400040"},
	}
	lock, err := storage.New(d.cfg.State.Dir).TryLock()
	require.NoError(t, err)
	defer lock.Unlock()
	require.NoError(t, lock.Save(d.state))
	return d
}

func (d *renewalDevice) run(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), append(args, "--config", d.config), &stdout, &stderr)
	require.NoError(t, err, stderr.String())
	return stdout.String()
}

// TestStatusShowsRenewal: with the agent stopped, status and identity show the operational
// certificate's next renewal (computed from the stored certificate and [certificates]), the
// last renewal's outcome and the renewed certificate on trial, in text and JSON.
func TestStatusShowsRenewal(t *testing.T) {
	d := newRenewalDevice(t)
	due := device.RenewalTime(d.cfg.Certificates, d.operational.Certificate())
	trial := certcodec.Thumbprint(d.trial.Certificate())

	var r statusReport
	require.NoError(t, json.Unmarshal([]byte(d.run(t, "status", "--json")), &r))
	require.Len(t, r.Certificates, 2)
	op := r.Certificates[1]
	assert.Equal(t, "operational", op.Role)
	require.NotNil(t, op.Renewal)
	assert.True(t, due.Equal(op.Renewal.NextAt), "next renewal %s, want %s", op.Renewal.NextAt, due)
	assert.Empty(t, op.Renewal.State, "no agent runs")
	assert.Equal(t, d.state.LastRenewal, op.Renewal.Last)
	require.NotNil(t, op.Renewal.Pending)
	assert.Equal(t, device.PendingRenewal{SHA256Thumbprint: trial, NotAfter: d.trial.Certificate().NotAfter,
		Via: device.ViaDPS, IssuedAt: d.state.Renewal.IssuedAt, Key: d.state.Renewal.OperationalKey}, *op.Renewal.Pending)
	assert.Nil(t, r.Certificates[0].Renewal, "the onboarding certificate is not renewed")

	text := d.run(t, "status")
	assert.Contains(t, text, "\n  next renewal:     "+due.UTC().Format(time.RFC3339)+" (due: the agent renews it as soon as it runs)\n")
	assert.Contains(t, text, "\n  last renewal:     failed through the hub at "+d.state.LastRenewal.At.Format(time.RFC3339)+": the hub answered 400040\n")
	assert.Contains(t, text, "\n  on trial:         renewed certificate "+trial+" waiting for the hub to accept it (issued through DPS at ")

	var id identityReport
	require.NoError(t, json.Unmarshal([]byte(d.run(t, "identity", "--json")), &id))
	require.NotNil(t, id.Operational)
	assert.Equal(t, op.Renewal, id.Operational.Renewal)
	assert.Contains(t, d.run(t, "identity"), "\n  on trial:         renewed certificate "+trial+" waiting")
}

// TestOperationalRenewalLive: with the agent running, the next renewal and the last outcome
// are the agent's own (its retry time, the attempt under way), not the computed ones.
func TestOperationalRenewalLive(t *testing.T) {
	d := newRenewalDevice(t)
	retry := time.Now().Add(10 * time.Minute).UTC().Truncate(time.Second)
	last := &storage.RenewalResult{At: time.Now().UTC(), Result: storage.RenewalFailed, Via: device.ViaHub, Error: "no answer"}
	live := &device.Status{Renewal: &device.RenewalStatus{State: device.RenewalRetrying, NextAt: retry, Via: device.ViaDPS, Failures: 2, Last: last}}
	op, err := describeOperational(d.cfg, d.state, live)
	require.NoError(t, err)
	assert.Equal(t, &device.RenewalInfo{NextAt: retry, State: device.RenewalRetrying, Via: device.ViaDPS, Failures: 2, Last: last, Pending: op.Renewal.Pending}, op.Renewal)
	assert.Equal(t, retry.Format(time.RFC3339)+" (retrying through DPS after 2 failed attempt(s))", nextRenewal(op.Renewal, time.Now()))

	live.Renewal = &device.RenewalStatus{State: device.RenewalVerifying}
	op, err = describeOperational(d.cfg, d.state, live)
	require.NoError(t, err)
	assert.True(t, device.RenewalTime(d.cfg.Certificates, d.operational.Certificate()).Equal(op.Renewal.NextAt), "no schedule while verifying: the certificate's own time")
	assert.Equal(t, d.state.LastRenewal, op.Renewal.Last, "the agent has none of its own yet")
	assert.Equal(t, "under way: connecting to the hub with the new certificate", nextRenewal(op.Renewal, time.Now()))
}
