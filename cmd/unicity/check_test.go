package main

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

// operationalFixture is an operational certificate valid for 10 days from from, with its key
// in a software keyfile, and the state that holds it.
func operationalFixture(t *testing.T, from time.Time) (*pki.Leaf, *storage.State) {
	t.Helper()
	ca, err := pki.NewRoot("issuing CA")
	require.NoError(t, err)
	leaf, err := ca.NewDevice("gw-0001", pki.WithValidity(from, from.Add(10*24*time.Hour)))
	require.NoError(t, err)
	keyPath := filepath.Join(t.TempDir(), "operational-A.key")
	require.NoError(t, certcodec.WritePrivateKey(keyPath, leaf.Key))
	return leaf, &storage.State{IssuedChain: [][]byte{leaf.Chain[0].Raw}, OperationalKey: "file:" + keyPath}
}

func issuingConfig() config.Config {
	cfg := config.Default()
	cfg.Certificates.Issuance = "dps"
	return cfg
}

// TestCheckOperational: check passes an operational certificate until its renewal time
// (device.RenewalTime, jitter included), warns past it, fails once it expired with the exit
// code of an expired certificate (78), and warns when there is none yet.
func TestCheckOperational(t *testing.T) {
	from := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	leaf, st := operationalFixture(t, from)
	cfg := issuingConfig()
	due := device.RenewalTime(cfg.Certificates, leaf.Certificate())

	defer func(saved func() time.Time) { now = saved }(now)
	for _, tt := range []struct {
		at     time.Time
		state  *storage.State
		result string
	}{
		{from.Add(24 * time.Hour), st, "pass"},
		{due.Add(-time.Minute), st, "pass"},
		{due.Add(time.Minute), st, "warn"},
		{from.Add(11 * 24 * time.Hour), st, "fail"},
		{from.Add(time.Hour), &storage.State{}, "warn"},
	} {
		now = func() time.Time { return tt.at }
		var c checker
		c.operational(&cfg, tt.state, nil)
		require.Len(t, c.results, 1)
		assert.Equal(t, tt.result, c.results[0].Result, "at %s: %s", tt.at, c.results[0].Detail)
		switch tt.result {
		case "pass":
			assert.Contains(t, c.results[0].Detail, "renewal at "+due.UTC().Format(time.RFC3339))
		case "warn":
			assert.NotContains(t, c.results[0].Detail, "renewal at")
		case "fail":
			assert.ErrorIs(t, c.failure, device.ErrOperationalExpired)
			assert.Equal(t, exitConfig, exitCode(c.failure))
		}
	}
	now = func() time.Time { return due.Add(time.Minute) }
	var c checker
	c.operational(&cfg, st, nil)
	assert.Contains(t, c.results[0].Detail, "past its renewal time "+due.UTC().Format(time.RFC3339)+": the agent renews it while it runs")
}

// TestCheckOperationalRenewal: past its renewal time, check's warning says why the certificate
// is not renewed yet: the renewed one waits for the hub, or the last renewal failed.
func TestCheckOperationalRenewal(t *testing.T) {
	from := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	leaf, st := operationalFixture(t, from)
	renewed, next := operationalFixture(t, from.Add(9*24*time.Hour))
	cfg := issuingConfig()
	defer func(saved func() time.Time) { now = saved }(now)
	now = func() time.Time { return device.RenewalTime(cfg.Certificates, leaf.Certificate()).Add(time.Hour) }

	failed := *st
	failed.LastRenewal = &storage.RenewalResult{At: now(), Result: storage.RenewalFailed, Via: device.ViaHub, Error: "hub answered 400040"}
	var c checker
	c.operational(&cfg, &failed, nil)
	assert.Equal(t, "warn", c.results[0].Result)
	assert.Contains(t, c.results[0].Detail, "the last renewal failed through the hub at "+now().UTC().Format(time.RFC3339)+": hub answered 400040")

	trial := *st
	trial.Renewal = &storage.Renewal{IssuedChain: next.IssuedChain, OperationalKey: next.OperationalKey, Via: device.ViaDPS, IssuedAt: now()}
	c = checker{}
	c.operational(&cfg, &trial, nil)
	assert.Equal(t, "warn", c.results[0].Result)
	assert.Contains(t, c.results[0].Detail, "renewed certificate "+certcodec.Thumbprint(renewed.Certificate())+" waiting for the hub to accept it (issued through DPS")
}

// TestCheckOperationalKey: check loads the operational certificate's key and returns the TLS
// identity the hub is reached with; a key that is gone or is another's is a warning, as the
// agent then registers for a new certificate, and no identity.
func TestCheckOperationalKey(t *testing.T) {
	from := time.Now().Add(-time.Hour)
	leaf, st := operationalFixture(t, from)
	_, other := operationalFixture(t, from)
	cfg := issuingConfig()
	keys := attest.NewOpener(context.Background(), "")
	defer keys.Close()

	var c checker
	cert, release := c.operational(&cfg, st, keys)
	require.NotNil(t, cert, c.results[0].Detail)
	assert.Equal(t, "pass", c.results[0].Result)
	assert.Equal(t, leaf.Certificate().Raw, cert.Certificate[0])
	release()

	for name, key := range map[string]string{"missing": "file:" + filepath.Join(t.TempDir(), "gone.key"), "another's": other.OperationalKey} {
		bad := *st
		bad.OperationalKey = key
		c = checker{}
		cert, release = c.operational(&cfg, &bad, keys)
		release()
		assert.Nil(t, cert, name)
		assert.Equal(t, "warn", c.results[0].Result, name)
		assert.Contains(t, c.results[0].Detail, "cannot be used", name)
		assert.Nil(t, c.failure, name)
	}
}
