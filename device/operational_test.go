package device_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

// issuanceRig is the agent with [certificates] issuance = "dps" over the emulators (DPS with
// a credential policy on the factory group, a hub that trusts the chains it issues) on real
// TLS on loopback, its onboarding key a software one and its operational keys in swtpm.
type issuanceRig struct {
	t     *testing.T
	dps   *dpstest.Server
	hub   *hubtest.Server
	cfg   *config.Config
	tpm   string
	clock *offsetClock
	// onboardingKey is the onboarding certificate's key, a software one: `factory install`
	// needs no TPM for it while the agent holds swtpm.
	onboardingKey crypto.Signer
	// onboardingPoll is the agent's OnboardingPoll: zero, as by default, watches nothing.
	onboardingPoll time.Duration

	agent  *device.Agent
	mu     sync.Mutex
	events []string
	full   []device.CredentialEvent
	cancel context.CancelFunc
	done   chan error
}

// newIssuanceRig makes the rig, its onboarding certificate issued by the factory CA with
// opts.
func newIssuanceRig(t *testing.T, opts ...pki.Option) *issuanceRig {
	t.Helper()
	tpm := "swtpm:" + attesttest.StartSWTPM(t)
	d, srv := hubtest.NewIssuing(t, time.Hour)

	dir := t.TempDir()
	leaf, err := d.FactoryCA().NewDevice("gw-ops", opts...)
	require.NoError(t, err)
	certPath, keyPath, bundle := filepath.Join(dir, "identity.pem"), filepath.Join(dir, "identity.key"), filepath.Join(dir, "roots.pem")
	require.NoError(t, certcodec.WriteCertificates(certPath, leaf.Chain...))
	require.NoError(t, certcodec.WritePrivateKey(keyPath, leaf.Key))
	require.NoError(t, os.WriteFile(bundle, d.TrustBundle(), 0o600))
	cfg, err := config.Parse("test.toml", fmt.Appendf(nil, `
[provisioning]
global_endpoint = %q
id_scope = %q
transport = "mqtt"
[attestation]
identity_cert = %q
identity_key = "file:%s"
[tpm]
device = %q
[tls]
trust_bundle = %q
[state]
dir = %q
[runtime]
dir = %q
[agent]
reprovision_interval = "0s"
[certificates]
issuance = "dps"
`, d.Addr(), d.IDScope(), certPath, keyPath, tpm, bundle, filepath.Join(dir, "state"), filepath.Join(dir, "run")))
	require.NoError(t, err)
	return &issuanceRig{t: t, dps: d, hub: srv, cfg: cfg, tpm: tpm, clock: &offsetClock{}, onboardingKey: leaf.Key}
}

func (r *issuanceRig) start() {
	r.t.Helper()
	prov, err := device.NewDPS(r.cfg)
	require.NoError(r.t, err)
	prov.Clock = hubtest.InstantClock{}
	r.agent = &device.Agent{
		Config:         r.cfg,
		Store:          storage.New(r.cfg.State.Dir),
		Provisioner:    prov,
		Hub:            device.NewHubSessions(r.cfg, prov.RootCAs),
		Clock:          r.clock,
		OnboardingPoll: r.onboardingPoll,
		Backoff:        func(int) time.Duration { return 10 * time.Millisecond },
		OnCredential: func(ev device.CredentialEvent) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.events = append(r.events, ev.Kind)
			r.full = append(r.full, ev)
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel, r.done = cancel, make(chan error, 1)
	go func() { r.done <- r.agent.Run(ctx) }()
	r.t.Cleanup(r.stop)
}

func (r *issuanceRig) stop() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	<-r.done
}

// waitFor waits until the agent's status satisfies ok.
func (r *issuanceRig) waitFor(what string, ok func(device.Status) bool) device.Status {
	r.t.Helper()
	var s device.Status
	require.Eventually(r.t, func() bool {
		s = r.agent.Status()
		return ok(s)
	}, 30*time.Second, 5*time.Millisecond, "%s; last status: %+v", what, &s)
	return s
}

func (r *issuanceRig) connected() device.Status {
	r.t.Helper()
	return r.waitFor("connected", func(s device.Status) bool { return s.Phase == device.PhaseConnected })
}

// state is the stored state, whose operational key is a keyfile in the state directory.
func (r *issuanceRig) state() *storage.State {
	r.t.Helper()
	st, err := storage.New(r.cfg.State.Dir).Load()
	require.NoError(r.t, err)
	require.NotEmpty(r.t, st.IssuedChain)
	require.True(r.t, strings.HasPrefix(st.OperationalKey, "tpmkey:"+r.cfg.State.Dir+"/operational-"), st.OperationalKey)
	fi, err := os.Stat(strings.TrimPrefix(st.OperationalKey, "tpmkey:"))
	require.NoError(r.t, err)
	assert.Equal(r.t, os.FileMode(0o600), fi.Mode().Perm())
	return st
}

// keyfiles are the operational keyfiles in the state directory.
func (r *issuanceRig) keyfiles() []string {
	paths, err := filepath.Glob(filepath.Join(r.cfg.State.Dir, "operational-*"))
	require.NoError(r.t, err)
	return paths
}

// hubAccepts are the thumbprints of the operational certificates the hub accepts for the
// device.
func (r *issuanceRig) hubAccepts() []string {
	r.t.Helper()
	info, err := r.hub.Hub.Device("gw-ops")
	require.NoError(r.t, err)
	var out []string
	for _, c := range info.Operational {
		out = append(out, c.Thumbprint)
	}
	return out
}

// transientObjects counts the objects and sessions left loaded in the TPM, once the agent
// stopped.
func (r *issuanceRig) transientObjects() int {
	r.t.Helper()
	return len(attesttest.LoadedInSWTPM(r.t, r.tpm))
}

func leafThumbprint(t *testing.T, st *storage.State) string {
	t.Helper()
	c, err := x509.ParseCertificate(st.IssuedChain[0])
	require.NoError(t, err)
	return certcodec.Thumbprint(c)
}

// offsetClock is the system clock, set ahead by offset while the agent is stopped.
type offsetClock struct{ offset time.Duration }

func (c *offsetClock) Now() time.Time                         { return time.Now().Add(c.offset) }
func (c *offsetClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

func TestIssuedCertificateReachesTheHub(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	s := r.connected()
	assert.Equal(t, device.CredentialOperational, s.Credential)
	st := r.state()
	assert.Contains(t, r.hubAccepts(), leafThumbprint(t, st))
	assert.Len(t, r.keyfiles(), 1)

	// The next start uses the stored credential: no registration.
	r.stop()
	calls := r.dps.Stats().Registrations
	r.start()
	r.connected()
	assert.Equal(t, calls, r.dps.Stats().Registrations)
	r.stop()
	assert.Zero(t, r.transientObjects(), "no key left loaded in the TPM")
}

func TestRevokedCertificateRegistersWithANewKey(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	r.connected()
	first := r.state()
	// The hub closes the connection only if it used the revoked certificate.
	_, err := r.hub.Hub.Revoke("gw-ops", leafThumbprint(t, first))
	require.NoError(t, err)

	r.waitFor("a new operational certificate", func(s device.Status) bool {
		st, err := storage.New(r.cfg.State.Dir).Load()
		return s.Phase == device.PhaseConnected && err == nil && st.OperationalKey != first.OperationalKey
	})
	second := r.state()
	assert.NotEqual(t, leafThumbprint(t, first), leafThumbprint(t, second))
	assert.Equal(t, []string{leafThumbprint(t, second)}, r.hubAccepts())
	r.mu.Lock()
	assert.Equal(t, []string{device.EventIssued, device.EventFellBack, device.EventIssued}, r.events)
	r.mu.Unlock()
	assert.NoFileExists(t, strings.TrimPrefix(first.OperationalKey, "tpmkey:"), "the old key is destroyed")
	assert.Len(t, r.keyfiles(), 1)
	r.stop()
	assert.Zero(t, r.transientObjects(), "no key left loaded in the TPM")
}

func TestExpiredWhileOfflineRegistersAgain(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	r.connected()
	first := r.state()
	r.stop()

	// Off for longer than the first certificate lasts; the policy now issues for longer.
	require.NoError(t, r.dps.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Name: "ops", Validity: 30 * 24 * time.Hour}))
	r.clock.offset = 2 * time.Hour
	r.start()
	r.waitFor("a new operational certificate", func(s device.Status) bool {
		st, err := storage.New(r.cfg.State.Dir).Load()
		return s.Phase == device.PhaseConnected && err == nil && st.OperationalKey != first.OperationalKey
	})
	assert.Contains(t, r.agent.Status().LastError, "expired")
	assert.NoFileExists(t, strings.TrimPrefix(first.OperationalKey, "tpmkey:"))
	assert.Len(t, r.keyfiles(), 1)
	issued := r.eventsOf(device.EventIssued)
	require.NotEmpty(t, issued)
	assert.Equal(t, leafThumbprint(t, first), issued[len(issued)-1].Replaced, "the journal names the certificate it replaces")
}

func TestStateNamingAMissingKeyRegistersAgain(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	r.connected()
	first := r.state()
	r.stop()
	// The key moved away: the state names a missing keyfile, and the keyfile no state names
	// is what a power cut between the key and the state leaves.
	orphan := filepath.Join(r.cfg.State.Dir, "operational-orphan.key")
	require.NoError(t, os.Rename(strings.TrimPrefix(first.OperationalKey, "tpmkey:"), orphan))

	r.start()
	r.waitFor("a new operational certificate", func(s device.Status) bool {
		st, err := storage.New(r.cfg.State.Dir).Load()
		return s.Phase == device.PhaseConnected && err == nil && st.OperationalKey != first.OperationalKey
	})
	assert.Contains(t, r.agent.Status().LastError, "missing")
	assert.NoFileExists(t, orphan, "a keyfile no state names is collected")
	assert.Len(t, r.keyfiles(), 1)
}

func TestMQTT5HubParks(t *testing.T) {
	r := newIssuanceRig(t)
	r.dps.SetConnectionProfile(r.hub.Name(), dpstest.ProfileMQTTv5)
	r.start()
	s := r.waitFor("parked", func(s device.Status) bool { return s.Phase == device.PhaseParked })
	assert.Contains(t, s.Message, "MQTT 5")
	assert.Empty(t, r.keyfiles(), "the key made for the refused registration is destroyed")
	_, err := storage.New(r.cfg.State.Dir).Load()
	assert.ErrorIs(t, err, storage.ErrNotExist)
}

// TestProvisionByHandSendsACSR: `unicity provision` with issuance on registers as the agent
// does, with a CSR for a new key, so that the agent then starts on the stored operational
// certificate without registering again; a stored certificate the agent could not use is
// registered for again, and the keys replaced are destroyed.
func TestProvisionByHandSendsACSR(t *testing.T) {
	r := newIssuanceRig(t)
	prov, err := device.NewDPS(r.cfg)
	require.NoError(t, err)
	prov.Clock = hubtest.InstantClock{}
	reg := &device.StandaloneRegistration{Config: r.cfg, Store: storage.New(r.cfg.State.Dir), Provisioner: prov}
	ctx := context.Background()

	st, fresh, err := reg.Provision(ctx)
	require.NoError(t, err)
	assert.True(t, fresh)
	first := r.state()
	assert.Equal(t, st.OperationalKey, first.OperationalKey)
	assert.Equal(t, []string{leafThumbprint(t, first)}, r.hubAccepts())
	assert.Len(t, r.keyfiles(), 1)

	_, fresh, err = reg.Provision(ctx)
	require.NoError(t, err)
	assert.False(t, fresh, "provisioned, with a usable operational certificate")

	calls := r.dps.Stats().Registrations
	r.start()
	s := r.connected()
	assert.Equal(t, device.CredentialOperational, s.Credential)
	assert.Equal(t, calls, r.dps.Stats().Registrations, "the agent registers no more")
	r.stop()

	_, err = reg.Reprovision(ctx, true)
	require.NoError(t, err)
	second := r.state()
	assert.NotEqual(t, first.OperationalKey, second.OperationalKey)
	assert.NoFileExists(t, strings.TrimPrefix(first.OperationalKey, "tpmkey:"), "the replaced key is destroyed")
	assert.Len(t, r.keyfiles(), 1)

	// Its key gone, the stored certificate cannot be used: provision registers for a new one.
	require.NoError(t, os.Remove(strings.TrimPrefix(second.OperationalKey, "tpmkey:")))
	_, fresh, err = reg.Provision(ctx)
	require.NoError(t, err)
	assert.True(t, fresh)
	third := r.state()
	assert.NotEqual(t, second.OperationalKey, third.OperationalKey)
	assert.Len(t, r.keyfiles(), 1)
	assert.Zero(t, r.transientObjects(), "no key left loaded in the TPM")
}
