package device_test

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

// installOnboarding writes a new onboarding certificate for the rig's key, issued by ca,
// where the configuration points, as `unicity factory install` does on the live device. It
// returns the certificate.
func (r *issuanceRig) installOnboarding(ca *pki.CA, opts ...pki.Option) *x509.Certificate {
	r.t.Helper()
	leaf, err := ca.IssueDevice("gw-ops", r.onboardingKey.Public(), opts...)
	require.NoError(r.t, err)
	require.NoError(r.t, certcodec.WriteCertificates(r.cfg.Attestation.IdentityCert, leaf.Chain...))
	return leaf.Certificate()
}

func (r *issuanceRig) reload() error {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return r.agent.Reload(ctx)
}

func (r *issuanceRig) onboardingThumbprint() string {
	r.t.Helper()
	chain, err := certcodec.ReadCertificates(r.cfg.Attestation.IdentityCert)
	require.NoError(r.t, err)
	return certcodec.Thumbprint(chain[0])
}

// rolledTo waits until the agent is connected with a state bound to cert, the roll over.
func (r *issuanceRig) rolledTo(cert *x509.Certificate) {
	r.t.Helper()
	r.waitFor("rolled", func(s device.Status) bool {
		st, err := storage.New(r.cfg.State.Dir).Load()
		return s.Phase == device.PhaseConnected && s.Onboarding == nil && err == nil && st.Binding == certcodec.Thumbprint(cert)
	})
}

func (r *issuanceRig) eventsOf(kind string) []device.CredentialEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []device.CredentialEvent
	for _, ev := range r.full {
		if ev.Kind == kind {
			out = append(out, ev)
		}
	}
	return out
}

func TestExpiredOnboardingKeepsTheOperationalCredential(t *testing.T) {
	r := newIssuanceRig(t, pki.WithValidity(time.Now().Add(-time.Hour), time.Now().Add(30*time.Minute)))
	require.NoError(t, r.dps.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Name: "ops", Validity: 30 * 24 * time.Hour}))
	onboarding := r.onboardingThumbprint()
	r.start()
	r.connected()
	first := r.state()
	r.stop()

	// An hour later the onboarding certificate has expired; the operational one has not.
	r.clock.offset = time.Hour
	calls := r.dps.Stats().Registrations
	r.start()
	s := r.connected()
	assert.Equal(t, device.CredentialOperational, s.Credential)
	assert.Equal(t, "gw-ops", s.RegistrationID, "the CN of the expired certificate")
	require.NotNil(t, s.Onboarding)
	require.NotNil(t, s.Onboarding.Expired)
	assert.Equal(t, onboarding, s.Onboarding.Expired.SHA256Thumbprint)
	assert.Equal(t, "CN=gw-ops", s.Onboarding.Expired.Subject)
	assert.Contains(t, s.LastError, "DPS cannot be reached until a new one is installed")
	assert.Equal(t, leafThumbprint(t, first), leafThumbprint(t, r.state()))

	// A registration asked for is refused without a DPS connection; the device stays
	// connected.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := r.agent.Register(ctx, device.Request{Force: true})
	require.ErrorIs(t, err, device.ErrOnboardingExpired)
	assert.ErrorIs(t, err, device.ErrIdentity, "exit 78 for `unicity reprovision`")
	assert.Equal(t, device.PhaseConnected, r.agent.Status().Phase)

	// What cannot do without DPS parks, with no DPS connection: the hub refuses the
	// operational certificate.
	_, err = r.hub.Hub.Revoke("gw-ops", leafThumbprint(t, first))
	require.NoError(t, err)
	s = r.waitFor("parked", func(s device.Status) bool { return s.Phase == device.PhaseParked })
	assert.Contains(t, s.Message, "the onboarding certificate has expired: CN=gw-ops")
	assert.Contains(t, s.Message, onboarding)
	assert.Contains(t, s.Message, "`unicity factory install`, then `systemctl reload unicity`")
	assert.Equal(t, calls, r.dps.Stats().Registrations)
	_, err = storage.New(r.cfg.State.Dir).Load()
	assert.NoError(t, err, "the assignment stays stored")
}

func TestExpiredOnboardingParksUntilANewOneIsInstalled(t *testing.T) {
	r := newIssuanceRig(t, pki.WithValidity(time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)))
	expired := r.onboardingThumbprint()
	r.start()
	s := r.waitFor("parked", func(s device.Status) bool { return s.Phase == device.PhaseParked })
	assert.Contains(t, s.Message, expired)
	assert.Contains(t, s.Message, "unicity factory install")
	assert.Equal(t, "gw-ops", s.RegistrationID)
	require.NotNil(t, s.Onboarding)
	require.NotNil(t, s.Onboarding.Expired)
	assert.Zero(t, r.dps.Stats().Registrations)

	// A new certificate, reloaded (SIGHUP): the agent registers with it.
	fresh := r.installOnboarding(r.dps.FactoryCA())
	require.NoError(t, r.reload())
	s = r.connected()
	assert.Nil(t, s.Onboarding)
	assert.Equal(t, device.CredentialOperational, s.Credential)
	st := r.state()
	assert.Equal(t, certcodec.Thumbprint(fresh), st.Binding)
	require.NotEmpty(t, st.OnboardingChain)
	assert.Equal(t, fresh.Raw, st.OnboardingChain[0], "the state records the identity it is bound to")
	assert.Equal(t, r.cfg.Attestation.IdentityKey, st.OnboardingKey)
}

func TestUnusableNewOnboardingCertificateLeavesTheOldOne(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	r.connected()
	before := r.state()
	// Another key's certificate: it cannot be used, and nothing changes.
	other, err := r.dps.FactoryCA().NewDevice("gw-ops")
	require.NoError(t, err)
	require.NoError(t, certcodec.WriteCertificates(r.cfg.Attestation.IdentityCert, other.Chain...))
	err = r.reload()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the one in use stays")
	s := r.agent.Status()
	assert.Equal(t, device.PhaseConnected, s.Phase)
	assert.Nil(t, s.Onboarding)
	assert.Equal(t, before.Binding, r.state().Binding)
}

func TestRollAccepted(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	r.connected()
	old := r.state()
	registrations := r.dps.Stats().Registrations

	fresh := r.installOnboarding(r.dps.FactoryCA())
	require.NoError(t, r.reload())
	r.rolledTo(fresh)
	st := r.state()
	assert.Equal(t, fresh.Raw, st.OnboardingChain[0])
	assert.NotEqual(t, old.OperationalKey, st.OperationalKey, "the registration issued a new operational certificate")
	assert.Eventually(t, func() bool {
		_, err := os.Stat(filepath.Clean(old.OperationalKey[len("tpmkey:"):]))
		return os.IsNotExist(err)
	}, 5*time.Second, 5*time.Millisecond, "the old operational key is destroyed once the new state is stored")
	assert.Equal(t, registrations+1, r.dps.Stats().Registrations)
	rolled := r.eventsOf(device.EventRolled)
	require.Len(t, rolled, 1)
	assert.Equal(t, old.Binding, rolled[0].Replaced)
	assert.Equal(t, certcodec.Thumbprint(fresh), rolled[0].Thumbprint)
	assert.Nil(t, r.agent.Status().Onboarding)

	// Reloading the same certificate again is nothing.
	require.NoError(t, r.reload())
	assert.Equal(t, registrations+1, r.dps.Stats().Registrations)
	r.stop()
	assert.Zero(t, r.transientObjects(), "no key left loaded in the TPM")
}

// refusedRoll starts the agent, connects it, and rolls it to an onboarding certificate from a
// CA DPS does not know yet, which DPS refuses. old is the assignment in force before.
func (r *issuanceRig) refusedRoll() (old *storage.State, fresh *x509.Certificate, newCA *pki.CA, s device.Status) {
	r.t.Helper()
	r.start()
	r.connected()
	old = r.state()
	newCA, err := pki.NewRoot("unicity new factory CA")
	require.NoError(r.t, err)
	fresh = r.installOnboarding(newCA)
	require.NoError(r.t, r.reload())
	s = r.waitFor("roll refused", func(s device.Status) bool {
		return s.Onboarding != nil && s.Onboarding.Roll != nil && s.Onboarding.Roll.Reason != "" &&
			strings.Contains(s.Message, "certificate roll pending")
	})
	return old, fresh, newCA, s
}

func TestRollRefusedKeepsTheOldIdentity(t *testing.T) {
	r := newIssuanceRig(t)
	old, fresh, newCA, s := r.refusedRoll()
	assert.Equal(t, device.PhaseConnected, s.Phase)
	assert.Equal(t, old.Binding, s.Onboarding.Roll.From)
	assert.Equal(t, certcodec.Thumbprint(fresh), s.Onboarding.Roll.To)
	assert.False(t, s.Onboarding.Roll.NextTry.IsZero())
	assert.Contains(t, s.Message, "certificate roll pending")
	assert.Equal(t, old, r.state(), "the old assignment stays, untouched")
	assert.Contains(t, r.hubAccepts(), leafThumbprint(t, old))
	refused := r.eventsOf(device.EventRollRefused)
	require.Len(t, refused, 1)
	assert.Equal(t, old.Binding, refused[0].Replaced)

	// Across a restart, with the configuration naming the new certificate: the state's
	// record of the old identity keeps it in force, and the roll is tried again.
	r.stop()
	r.start()
	s = r.waitFor("roll refused again", func(s device.Status) bool {
		return s.Phase == device.PhaseConnected && s.Onboarding != nil && s.Onboarding.Roll != nil && s.Onboarding.Roll.Reason != ""
	})
	assert.Equal(t, old.Binding, s.Onboarding.Roll.From)
	assert.Equal(t, old, r.state())
	assert.Len(t, r.eventsOf(device.EventRollRefused), 2)

	// DPS enrolls the new CA: the next reload rolls.
	require.NoError(t, r.dps.AddGroup(dpstest.Group{ID: "new-factory", CA: newCA.Certificate,
		Policy: dpstest.Policy{Credential: &dpstest.CredentialPolicy{Name: "ops", Validity: time.Hour}}}))
	require.NoError(t, r.reload())
	r.rolledTo(fresh)
	assert.Nil(t, r.agent.Status().Onboarding)
	assert.Len(t, r.eventsOf(device.EventRolled), 1)
	assert.Eventually(t, func() bool { return len(r.keyfiles()) == 1 }, 5*time.Second, 5*time.Millisecond,
		"the old operational key is destroyed once the new state is stored")
	r.connected() // stopped while connecting, a key being loaded would stay in the TPM until the next open
	r.stop()
	assert.Zero(t, r.transientObjects(), "no key left loaded in the TPM")
}

func TestNewOnboardingFileIsNoticed(t *testing.T) {
	r := newIssuanceRig(t)
	r.onboardingPoll = 10 * time.Millisecond
	r.start()
	r.connected()
	fresh := r.installOnboarding(r.dps.FactoryCA())
	// No reload: the agent sees the file change at its next look.
	r.rolledTo(fresh)
	assert.Len(t, r.eventsOf(device.EventRolled), 1)
}

func TestStateFromBeforeTheRecordGetsIt(t *testing.T) {
	r := newIssuanceRig(t)
	r.start()
	r.connected()
	r.stop()
	// A state as an agent before onboarding_chain wrote it.
	st := r.state()
	st.OnboardingChain, st.OnboardingKey = nil, ""
	l, err := storage.New(r.cfg.State.Dir).TryLock()
	require.NoError(t, err)
	require.NoError(t, l.Save(st))
	require.NoError(t, l.Unlock())

	r.start()
	r.connected()
	again := r.state()
	require.NotEmpty(t, again.OnboardingChain, "recorded at the start")
	assert.Equal(t, r.onboardingThumbprint(), certcodec.Thumbprint(mustParse(t, again.OnboardingChain[0])))
	assert.Equal(t, r.cfg.Attestation.IdentityKey, again.OnboardingKey)
	assert.Equal(t, st.OperationalKey, again.OperationalKey, "nothing else changes")
}

func mustParse(t *testing.T, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return c
}

// While a roll is pending, a registration the device needs for another reason (here its
// operational certificate was revoked) is made with the onboarding certificate the assignment
// is bound to when DPS refuses the new one: the device stays in service.
func TestRegistrationDuringAPendingRollUsesTheOldIdentity(t *testing.T) {
	r := newIssuanceRig(t)
	old, _, _, _ := r.refusedRoll()
	_, err := r.hub.Hub.Revoke("gw-ops", leafThumbprint(t, old))
	require.NoError(t, err)
	s := r.waitFor("a new operational certificate", func(s device.Status) bool {
		st, err := storage.New(r.cfg.State.Dir).Load()
		return s.Phase == device.PhaseConnected && err == nil && st.OperationalKey != old.OperationalKey
	})
	require.NotNil(t, s.Onboarding)
	require.NotNil(t, s.Onboarding.Roll, "the roll is still pending")
	st := r.state()
	assert.Equal(t, old.Binding, st.Binding, "registered with the certificate the assignment is bound to")
	assert.Equal(t, old.OnboardingChain, st.OnboardingChain)
	assert.Equal(t, old.OnboardingKey, st.OnboardingKey)
	assert.Empty(t, r.eventsOf(device.EventRolled))
}
