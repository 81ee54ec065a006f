package main

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

// TestCheckOperational: check passes an operational certificate early in its life, warns in
// its last 20 %, fails once it expired, and warns when there is none yet.
func TestCheckOperational(t *testing.T) {
	ca, err := pki.NewRoot("issuing CA")
	require.NoError(t, err)
	from := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	leaf, err := ca.NewDevice("gw-0001", pki.WithValidity(from, from.Add(10*24*time.Hour)))
	require.NoError(t, err)
	st := &storage.State{IssuedChain: [][]byte{leaf.Chain[0].Raw}, OperationalKey: "tpmkey:/var/lib/unicity/operational-A.key"}
	cfg := config.Default()
	cfg.Certificates.Issuance = "dps"

	defer func(saved func() time.Time) { now = saved }(now)
	for _, tt := range []struct {
		at     time.Duration
		state  *storage.State
		result string
	}{
		{24 * time.Hour, st, "pass"},
		{9 * 24 * time.Hour, st, "warn"},
		{11 * 24 * time.Hour, st, "fail"},
		{time.Hour, &storage.State{}, "warn"},
	} {
		now = func() time.Time { return from.Add(tt.at) }
		var c checker
		c.operational(&cfg, tt.state)
		require.Len(t, c.results, 1)
		assert.Equal(t, tt.result, c.results[0].Result, "at %s: %s", tt.at, c.results[0].Detail)
		if tt.result == "fail" {
			assert.ErrorIs(t, c.failure, device.ErrOperationalExpired)
		}
	}

	var off checker
	off.operational(new(config.Default()), st)
	assert.Empty(t, off.results, "no line without issuance")
}
