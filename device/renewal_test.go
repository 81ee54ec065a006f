package device_test

import (
	"crypto/x509"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

func TestRenewalTimeIsSpreadAndStable(t *testing.T) {
	ca, err := pki.NewRoot("renewal test")
	require.NoError(t, err)
	cc := config.Default().Certificates
	seen := map[time.Time]bool{}
	for range 20 {
		leaf, err := ca.NewDevice("gw-0001")
		require.NoError(t, err)
		c := leaf.Chain[0]
		at := device.RenewalTime(cc, c)
		life := c.NotAfter.Sub(c.NotBefore)
		share := float64(at.Sub(c.NotBefore)) / float64(life)
		assert.InDelta(t, 0.8, share, 0.05+1e-9, "renew_at 0.8 ± renew_jitter 0.05")
		assert.Equal(t, at, device.RenewalTime(cc, c), "the same time for the same certificate")
		seen[at] = true
	}
	assert.Greater(t, len(seen), 15, "each certificate its own time")
}

// renewing starts the rig with its clock 55 minutes ahead: every certificate the emulators
// issue (for an hour) is past its renewal time (at most 51 minutes) as soon as it arrives, so
// the agent renews one after another.
func (r *issuanceRig) renewing() {
	r.clock.offset = 55 * time.Minute
	r.start()
}

// quiet stops the agent's renewals (the hub answers 503001, retry after an hour), so that it
// stops with no TPM command in flight: a stop in the middle of a renewal leaves what it was
// making in an exclusive TPM (the next open flushes it), which would hide a leak.
func (r *issuanceRig) quiet() {
	r.t.Helper()
	r.hub.Hub.FailIssue(0, hubtest.IssueFault{Status: 503, ErrorCode: 503001, RetryAfter: time.Hour})
	r.waitFor("no renewal under way", func(s device.Status) bool {
		return s.Phase == device.PhaseConnected && s.Renewal != nil && s.Renewal.State == device.RenewalRetrying
	})
}

// renewals are the renewed events so far.
func (r *issuanceRig) renewals() []device.CredentialEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []device.CredentialEvent
	for _, ev := range r.full {
		if ev.Kind == device.EventRenewed {
			out = append(out, ev)
		}
	}
	return out
}

func (r *issuanceRig) awaitRenewals(n int) []device.CredentialEvent {
	r.t.Helper()
	require.Eventually(r.t, func() bool { return len(r.renewals()) >= n }, 2*time.Minute, 5*time.Millisecond,
		"%d renewals; events %v; status %+v", n, r.eventKinds(), r.agent.Status())
	return r.renewals()
}

func (r *issuanceRig) eventKinds() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.events...)
}

func TestRenewsThroughTheHub(t *testing.T) {
	r := newIssuanceRig(t)
	r.renewing()
	evs := r.awaitRenewals(3)
	assert.Eventually(t, func() bool {
		s, err := device.ReadStatus(r.cfg.Runtime.Dir)
		return err == nil && s.Renewal != nil && s.Renewal.Last != nil && s.Renewal.Last.Result == storage.Renewed
	}, 10*time.Second, 5*time.Millisecond, "the status file follows the renewal, which changes no status line")
	st := r.state()
	require.NotNil(t, st.LastRenewal)
	assert.Equal(t, storage.Renewed, st.LastRenewal.Result)
	assert.Equal(t, device.ViaHub, st.LastRenewal.Via)
	assert.Equal(t, leafThumbprint(t, st), st.LastRenewal.Thumbprint)
	r.quiet()
	r.stop()
	assert.EqualValues(t, 1, r.dps.Stats().Registrations, "renewed through the hub, not DPS")
	for i, ev := range evs[:3] {
		assert.Equal(t, device.ViaHub, ev.Via)
		assert.NotEqual(t, ev.Replaced, ev.Thumbprint)
		if i > 0 {
			assert.Equal(t, evs[i-1].Thumbprint, ev.Replaced, "each replaces the one before")
		}
	}
	st = r.state()
	assert.Equal(t, storage.RenewalFailed, st.LastRenewal.Result, "a failure is recorded too")
	assert.Contains(t, st.LastRenewal.Error, "503001")
	assert.Nil(t, st.Renewal)
	assert.Contains(t, r.hubAccepts(), leafThumbprint(t, st))
	assert.Len(t, r.keyfiles(), 1, "the credential in force only")
	assert.Zero(t, r.transientObjects(), "no key left loaded in the TPM")
}

func TestHundredRenewalsLeakNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("100 renewals on swtpm")
	}
	r := newIssuanceRig(t)
	r.renewing()
	start := time.Now()
	r.awaitRenewals(100)
	t.Logf("100 renewals through the hub in %s", time.Since(start).Round(time.Millisecond))
	r.quiet()
	r.stop()
	assert.LessOrEqual(t, len(r.keyfiles()), 2, "the key in force and at most one on trial")
	assert.Zero(t, r.transientObjects(), "no key left loaded in the TPM")
	names := []string{strings.TrimPrefix(r.state().OperationalKey, "tpmkey:")}
	if st := r.state(); st.Renewal != nil {
		names = append(names, strings.TrimPrefix(st.Renewal.OperationalKey, "tpmkey:"))
	}
	assert.ElementsMatch(t, names, r.keyfiles(), "every keyfile left is named by the state")
}

func TestRenewalFallsBackToDPS(t *testing.T) {
	r := newIssuanceRig(t)
	r.hub.Hub.FailIssue(0, hubtest.IssueFault{Status: 400, ErrorCode: 400040})
	r.renewing()
	ev := r.awaitRenewals(1)[0]
	assert.Equal(t, device.ViaDPS, ev.Via, "a permanent refusal by the hub sends the next attempt to DPS")
	assert.Contains(t, r.eventKinds(), device.EventRenewalFailed)
	r.stop()
	assert.GreaterOrEqual(t, r.dps.Stats().Registrations, int64(2))
	st := r.state()
	assert.Equal(t, device.ViaDPS, st.LastRenewal.Via)
	assert.Contains(t, r.hubAccepts(), leafThumbprint(t, st))
}

func TestRenewedCertificateTheHubRefusesIsDropped(t *testing.T) {
	r := newIssuanceRig(t)
	r.hub.Hub.FailIssue(1, hubtest.IssueFault{Unsynced: true})
	r.renewing()
	r.awaitRenewals(1)
	r.quiet()
	r.stop()
	kinds := r.eventKinds()
	require.GreaterOrEqual(t, len(kinds), 3)
	assert.Equal(t, []string{device.EventIssued, device.EventRenewalFailed, device.EventRenewed}, kinds[:3],
		"the refused certificate is dropped, the old one stays, the next attempt renews")
	r.mu.Lock()
	assert.Contains(t, r.full[1].Reason, "refused the renewed certificate")
	r.mu.Unlock()
	assert.EqualValues(t, 1, r.dps.Stats().Registrations)
	assert.Zero(t, r.transientObjects())
}

// onTrial stops the agent after one renewal and rewrites the state as a power cut between
// storing the renewed certificate and the hub accepting it leaves it: the old credential in
// force (from a copy of the state directory taken before), the renewed one on trial.
func (r *issuanceRig) onTrial() (old, renewed *storage.State) {
	r.t.Helper()
	r.start()
	r.connected()
	r.stop()
	old = r.state()
	oldKey := strings.TrimPrefix(old.OperationalKey, "tpmkey:")
	keyCopy, err := os.ReadFile(oldKey)
	require.NoError(r.t, err)

	r.renewing()
	r.awaitRenewals(1)
	r.stop()
	r.clock.offset = 0
	renewed = r.state()
	if renewed.Renewal != nil { // stopped during the next renewal: drop it
		os.Remove(strings.TrimPrefix(renewed.Renewal.OperationalKey, "tpmkey:"))
		renewed.Renewal = nil
	}
	require.NoError(r.t, os.WriteFile(oldKey, keyCopy, 0o600))
	trial := *old
	trial.Renewal = &storage.Renewal{IssuedChain: renewed.IssuedChain, OperationalKey: renewed.OperationalKey, Via: device.ViaHub, IssuedAt: time.Now()}
	l, err := storage.New(r.cfg.State.Dir).TryLock()
	require.NoError(r.t, err)
	require.NoError(r.t, l.Save(&trial))
	l.Unlock()
	r.mu.Lock()
	r.events, r.full = nil, nil
	r.mu.Unlock()
	return old, renewed
}

func TestRenewalOnTrialIsTriedFirstAfterARestart(t *testing.T) {
	r := newIssuanceRig(t)
	old, renewed := r.onTrial()
	r.start()
	r.connected()
	ev := r.awaitRenewals(1)[0]
	assert.Equal(t, leafThumbprint(t, renewed), ev.Thumbprint)
	assert.Equal(t, leafThumbprint(t, old), ev.Replaced)
	r.stop()
	st := r.state()
	assert.Nil(t, st.Renewal)
	assert.Equal(t, renewed.OperationalKey, st.OperationalKey)
	assert.NoFileExists(t, strings.TrimPrefix(old.OperationalKey, "tpmkey:"), "the old key is destroyed once the new one is in force")
	assert.Len(t, r.keyfiles(), 1)
}

func TestRenewalOnTrialRefusedAfterARestartKeepsTheOld(t *testing.T) {
	r := newIssuanceRig(t)
	old, renewed := r.onTrial()
	_, err := r.hub.Hub.Revoke("gw-ops", leafThumbprint(t, renewed))
	require.NoError(t, err)
	r.start()
	r.connected()
	r.stop()
	assert.Equal(t, []string{device.EventRenewalFailed}, r.eventKinds())
	st := r.state()
	assert.Nil(t, st.Renewal)
	assert.Equal(t, old.OperationalKey, st.OperationalKey, "the old credential stays in force")
	assert.Equal(t, storage.RenewalFailed, st.LastRenewal.Result)
	assert.NoFileExists(t, strings.TrimPrefix(renewed.OperationalKey, "tpmkey:"))
	assert.EqualValues(t, 1, r.dps.Stats().Registrations)
}

func TestRenewalStatus(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	s := r.waitFor("renewal scheduled", func(s device.Status) bool { return s.Phase == device.PhaseConnected && s.Renewal != nil })
	c, err := x509.ParseCertificate(r.state().IssuedChain[0])
	require.NoError(t, err)
	assert.Equal(t, device.RenewalScheduled, s.Renewal.State)
	assert.Equal(t, device.RenewalTime(r.cfg.Certificates, c), s.Renewal.NextAt)
	assert.Equal(t, device.ViaHub, s.Renewal.Via)
	r.stop()

	// Transient refusals: retried through the hub, then through DPS.
	r.hub.Hub.FailIssue(0, hubtest.IssueFault{Status: 503, ErrorCode: 503001})
	r.renewing()
	s = r.waitFor("retrying", func(s device.Status) bool { return s.Renewal != nil && s.Renewal.State == device.RenewalRetrying })
	assert.Equal(t, storage.RenewalFailed, s.Renewal.Last.Result)
	assert.Equal(t, device.ViaHub, s.Renewal.Last.Via)
	assert.Contains(t, s.Renewal.Last.Error, "503001")
	assert.Contains(t, s.LastError, "renewing the operational certificate through the hub")
	ev := r.awaitRenewals(1)[0]
	r.hub.Hub.FailIssue(0, hubtest.IssueFault{})
	assert.Equal(t, device.ViaDPS, ev.Via)
	kinds := r.eventKinds()
	assert.Equal(t, []string{device.EventIssued, device.EventRenewalFailed, device.EventRenewalFailed, device.EventRenewalFailed, device.EventRenewed},
		kinds[:5], "three attempts through the hub before DPS")
	s = r.waitFor("scheduled again", func(s device.Status) bool {
		return s.Renewal != nil && s.Renewal.Last != nil && s.Renewal.Last.Result == storage.Renewed
	})
	assert.Zero(t, s.Renewal.Failures)
}

func TestRenewalRefusedByDPSWaitsTheParkedRetry(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	r.connected()
	r.stop()
	r.hub.Hub.FailIssue(0, hubtest.IssueFault{Status: 400, ErrorCode: 400040})
	require.NoError(t, r.dps.SetEnabled("factory", false))
	r.renewing()
	s := r.waitFor("refused by DPS", func(s device.Status) bool {
		return s.Renewal != nil && s.Renewal.Last != nil && s.Renewal.Last.Via == device.ViaDPS
	})
	assert.Equal(t, device.RenewalRetrying, s.Renewal.State)
	assert.Equal(t, device.PhaseConnected, s.Phase, "the certificate in force stays in use")
	assert.WithinDuration(t, r.clock.Now().Add(r.cfg.Agent.ParkedRetry), s.Renewal.NextAt, time.Minute,
		"a refusal is not asked again at the backoff's pace")
}

// A TPM that does not answer while the operational key loads is waited for: registering
// again would cost a registration and a key, and cure nothing.
func TestOperationalKeyWaitsForTheTPM(t *testing.T) {
	r := newIssuanceRig(t)
	proxy := attesttest.Wedge(t, strings.TrimPrefix(r.tpm, "swtpm:"))
	r.cfg.TPM.Device = proxy.Spec()
	r.start()
	r.connected()
	first := r.state()
	r.stop()

	proxy.Wedged.Store(true)
	r.start()
	s := r.waitFor("waiting for the TPM", func(s device.Status) bool { return s.Phase == device.PhaseWaitingTPM })
	assert.Contains(t, s.Message, "operational key")
	proxy.Wedged.Store(false)
	r.connected()
	r.stop()
	assert.EqualValues(t, 1, r.dps.Stats().Registrations, "no registration for a TPM that did not answer")
	assert.Equal(t, first.OperationalKey, r.state().OperationalKey)
	assert.NotContains(t, r.eventKinds(), device.EventFellBack)
}
