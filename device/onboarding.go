package device

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/storage"
)

// The onboarding credential beside the registrations (issue 14): a factory certificate that
// expired, and the roll to a new one installed while the agent runs.
//
// An expired onboarding certificate never stops the agent: it still knows who it is (the
// CN), a stored assignment keeps being served (with its operational credential, or with the
// onboarding identity for as long as the hub takes it), and what needs DPS parks until a new
// certificate is installed.
//
// A roll: `unicity factory install` writes a new certificate (and perhaps a new key) where
// the configuration points, and the agent loads it on SIGHUP (`systemctl reload unicity`),
// when it sees the certificate file change (Agent.OnboardingPoll), or at its next start. It then
// registers with the new identity, while the assignment in force stays bound to the old one,
// which it keeps proving (the state records its chain and key, for a restart meanwhile),
// until DPS accepts the new one. A refusal (an individual enrollment that does not list the
// new certificate yet) is retried on the parked cadence, or at the next reload.

// OnboardingPoll is how often `unicity run` has the agent look at the onboarding certificate
// file for a new one (Agent.OnboardingPoll): a stat, no read.
const OnboardingPoll = 10 * time.Second

// ErrOnboardingExpired marks a registration that needs DPS while the onboarding certificate
// is expired: it is refused without a connection, and the agent parks until a new
// certificate is installed.
var ErrOnboardingExpired = errors.New("the onboarding certificate has expired")

// Kinds of CredentialEvent for the onboarding identity.
const (
	// EventRolled: DPS accepted a new onboarding certificate (Thumbprint), and the state is
	// bound to it now instead of Replaced.
	EventRolled = "rolled"
	// EventRollRefused: the registration with the new onboarding certificate (Thumbprint)
	// failed (Reason); the one in force (Replaced) stays.
	EventRollRefused = "roll_refused"
)

// OnboardingStatus is the onboarding credential's trouble, in the status: absent when it is
// valid and in force.
type OnboardingStatus struct {
	// Expired is the certificate of the configured onboarding chain that expired: DPS
	// cannot be reached until a new one is installed.
	Expired *CertificateInfo `json:"expired,omitempty"`
	// Roll is a new onboarding certificate that DPS has not accepted yet.
	Roll *RollStatus `json:"roll,omitempty"`
}

// RollStatus is a pending certificate roll: the assignment in force stays bound to From
// until DPS accepts To.
type RollStatus struct {
	From string `json:"from_sha256_thumbprint"`
	To   string `json:"to_sha256_thumbprint"`
	// Reason is why the last registration with To failed; NextTry when the agent tries
	// again (or at the next reload).
	Reason  string    `json:"reason,omitempty"`
	NextTry time.Time `json:"next_try,omitzero"`
}

// onboarding is what the run knows of the onboarding credential beyond r.id.
type onboarding struct {
	// expired is the certificate of r.id's chain that expired, nil while it is valid.
	expired *x509.Certificate
	// bound is the onboarding identity the assignment in force is bound to while a roll to
	// r.id is pending; nil otherwise.
	bound *boundIdentity
	// rollDue fires when the pending roll is to be tried; nil without one.
	rollDue      <-chan time.Time
	rollFailures int
	// rolling is set during tryRoll's registration, which is the new identity's alone.
	rolling    bool
	rollReason string
	rollNext   time.Time
}

// boundIdentity is an onboarding identity the assignment in force is bound to, kept while
// a newer one is not accepted.
type boundIdentity struct {
	id      *Identity
	key     *attest.Key
	binding string
	release func()
}

// takeIdentity makes id (whose expired certificate, if any, is expired) the onboarding
// identity DPS is reached with.
func (r *run) takeIdentity(id *Identity, expired *x509.Certificate) {
	r.id, r.expired = id, expired
	r.a.setStatus(func(s *Status) { s.RegistrationID = id.RegistrationID })
	r.showOnboarding()
	if expired != nil {
		r.a.NoteError(r.expiredError())
	}
}

// checkOnboarding is the identity c makes at now, also when its certificate expired (then
// named by expired).
func checkOnboarding(c *Credentials, now time.Time) (id *Identity, expired *x509.Certificate, err error) {
	id, err = c.Identity(now)
	var e *ExpiredIdentityError
	if errors.As(err, &e) {
		return e.Identity, e.Certificate, nil
	}
	return id, nil, err
}

// onboardingUsable fails, marked ErrOnboardingExpired, when the onboarding certificate has
// expired (by now, if it was valid when loaded).
func (r *run) onboardingUsable() error {
	if r.id.X509 == nil {
		return nil
	}
	if r.expired == nil {
		now := r.a.Clock.Now()
		for _, c := range r.id.X509.Chain {
			if now.After(c.NotAfter) {
				r.expired = c
				r.showOnboarding()
				break
			}
		}
	}
	if r.expired == nil {
		return nil
	}
	return r.expiredError()
}

func (r *run) expiredError() error {
	m := attest.NewManifest(r.expired)
	return Mark(fmt.Errorf("%w: %s (serial %s, SHA-256 %s) expired at %s; DPS cannot be reached until a new one is installed (`unicity factory install`, then `systemctl reload unicity`)",
		ErrOnboardingExpired, r.expired.Subject, m.Serial, m.SHA256Thumbprint, m.NotAfter.UTC().Format(time.RFC3339)), ErrIdentity)
}

// showOnboarding puts the onboarding credential's trouble in the status.
func (r *run) showOnboarding() {
	var o *OnboardingStatus
	if r.expired != nil || r.bound != nil {
		o = &OnboardingStatus{}
	}
	if r.expired != nil {
		info := DescribeCertificate("onboarding", r.expired, r.creds.Key.Location, r.a.Clock.Now())
		o.Expired = &info
	}
	if r.bound != nil {
		o.Roll = &RollStatus{From: r.bound.binding, To: r.binding, Reason: r.rollReason, NextTry: r.rollNext}
	}
	r.a.setStatus(func(s *Status) { s.Onboarding = o })
}

// recordIdentity records in st the onboarding identity it is bound to, id with its key (see
// storage.State.OnboardingChain).
func (r *run) recordIdentity(st *storage.State, id *Identity, key *attest.Key) {
	if id.X509 == nil {
		return
	}
	st.OnboardingChain = nil
	for _, c := range id.X509.Chain {
		st.OnboardingChain = append(st.OnboardingChain, c.Raw)
	}
	st.OnboardingKey = key.Location
}

// recordInForce stores the onboarding identity with the assignment in force when a file
// from before storage.State.OnboardingChain lacks it: a roll must be able to keep it across
// a restart. Unlike a new assignment's, the write is not retried: the assignment in force
// is stored already (an assignment the disk refused is left to run.store's retries), and
// the next start tries again.
func (r *run) recordInForce() error {
	st := r.assignment
	if r.id.X509 == nil || st == nil || len(st.OnboardingChain) > 0 || !st.BelongsTo(r.id.RegistrationID, r.binding) || r.a.Status().StoreError != "" {
		return nil
	}
	rec := *st
	r.recordIdentity(&rec, r.id, r.creds.Key)
	r.a.saveMu.Lock()
	err := r.lock.Save(&rec)
	r.a.saveMu.Unlock()
	if err != nil {
		return fmt.Errorf("cannot record the onboarding identity in the state (a restart before the roll is over registers with the new certificate): %w", err)
	}
	r.inForce(&rec)
	return nil
}

// keepBound keeps in force st, bound to an onboarding identity other than the configured
// one, while a roll to the configured one is pending: st must record that identity, and it
// must still load. It reports whether it did.
func (r *run) keepBound(st *storage.State) bool {
	if r.id.X509 == nil || !RollPending(st, r.id.RegistrationID) {
		return false
	}
	old := &Credentials{}
	for _, der := range st.OnboardingChain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return false
		}
		old.Chain = append(old.Chain, c)
	}
	if !strings.EqualFold(certcodec.Thumbprint(old.Chain[0]), st.Binding) {
		return false
	}
	key, err := r.creds.tpm.LoadKey(st.OnboardingKey)
	if err != nil {
		r.a.NoteError(fmt.Errorf("the onboarding identity the stored assignment is bound to cannot be loaded (%w); registering with the configured one", err))
		return false
	}
	old.Key = key
	id, _, err := checkOnboarding(old, r.a.Clock.Now())
	if err != nil {
		key.Close()
		r.a.NoteError(fmt.Errorf("the onboarding identity the stored assignment is bound to cannot be used (%w); registering with the configured one", err))
		return false
	}
	r.bound = &boundIdentity{id: id, key: key, binding: st.Binding, release: old.closeKey}
	r.rollSoon()
	return true
}

// rollSoon has the pending roll tried once the hub is connected.
func (r *run) rollSoon() {
	r.rollFailures, r.rollReason, r.rollNext = 0, "", time.Time{}
	r.rollDue = r.a.Clock.After(0)
	r.showOnboarding()
}

// reload loads the configured onboarding credential again. A new certificate becomes the one
// DPS is reached with; the assignment in force stays bound to the one before it until DPS
// accepts the new one (see tryRoll). One that cannot be used leaves everything as it was.
func (r *run) reload() error {
	if r.id == nil || r.id.X509 == nil {
		return Mark(errors.New("no onboarding certificate to reload now: the agent loads it as it starts"), ErrTemporary)
	}
	creds, err := r.creds.Reload(r.a.Config)
	var id *Identity
	var expired *x509.Certificate
	if err == nil {
		id, expired, err = checkOnboarding(creds, r.a.Clock.Now())
		if err == nil && !strings.EqualFold(id.RegistrationID, r.id.RegistrationID) {
			err = Mark(fmt.Errorf("its CN %q is not this device's registration ID %q (restart the service to change the device's identity)", id.RegistrationID, r.id.RegistrationID), ErrIdentity)
		}
		if err != nil {
			creds.closeKey()
		}
	}
	if err != nil {
		err = fmt.Errorf("cannot use the new onboarding certificate, the one in use stays: %w", err)
		r.a.NoteError(err)
		return err
	}
	binding := creds.StateBinding()
	switch {
	case binding == r.binding:
		// The same certificate: a reload is also the technician's "try the roll now".
		creds.closeKey()
		if r.bound != nil {
			r.rollSoon()
		}
		return nil
	case r.bound != nil && binding == r.bound.binding:
		// Back to the certificate in force: no roll any more.
		r.bound.release()
		r.bound, r.rollDue = nil, nil
		r.creds.closeKey()
	case r.bound == nil && r.assignment != nil && r.assignment.BelongsTo(r.id.RegistrationID, r.binding):
		if err := r.recordInForce(); err != nil {
			r.a.NoteError(err)
		}
		r.bound = &boundIdentity{id: r.id, key: r.creds.Key, binding: r.binding, release: r.creds.closeKey}
	default:
		r.creds.closeKey()
	}
	r.creds, r.binding = creds, binding
	r.takeIdentity(id, expired)
	if r.bound != nil {
		r.rollSoon()
	}
	return nil
}

// tryRoll registers with the new onboarding identity. It reports whether DPS accepted it
// (the new assignment is in force then); otherwise the one in force stays and the roll is
// tried again later.
func (r *run) tryRoll(ctx context.Context) (rolled bool) {
	r.rollDue = nil
	r.a.setStatus(func(s *Status) {
		s.Message = fmt.Sprintf("registering %s with DPS with the new onboarding certificate %s; %s stays in force until then", r.id.RegistrationID, r.binding, r.assignment.AssignedHub)
	})
	r.rolling = true
	st, err := r.register(ctx, 1, r.a.Clock.Now())
	r.rolling = false
	if err == nil {
		r.connecting(st)
		return true
	}
	if ctx.Err() != nil {
		return false
	}
	r.rollFailures++
	d := r.a.Config.Agent.ParkedRetry
	if !errors.Is(err, ErrRefused) && !errors.Is(err, ErrOnboardingExpired) {
		d = r.a.Backoff(r.rollFailures)
	}
	r.rollDue = r.a.Clock.After(d)
	r.rollReason, r.rollNext = err.Error(), r.a.Clock.Now().Add(d)
	r.a.credentialEvent(CredentialEvent{Kind: EventRollRefused, Thumbprint: r.binding, Replaced: r.bound.binding, Reason: err.Error()})
	r.a.NoteError(fmt.Errorf("the new onboarding certificate is not accepted yet, %s stays in force: %w", r.bound.binding, err))
	r.showOnboarding()
	r.a.setStatus(func(s *Status) {
		s.Message = fmt.Sprintf("connected to %s as %s; certificate roll pending: DPS did not accept the new onboarding certificate (next try at %s, or `systemctl reload unicity`)",
			r.assignment.AssignedHub, r.assignment.DeviceID, r.rollNext.UTC().Format(time.RFC3339))
	})
	return false
}

// rolledOnto ends a pending roll once st, bound to the new onboarding identity, is in force.
func (r *run) rolledOnto(st *storage.State) {
	if r.bound == nil {
		return
	}
	r.a.credentialEvent(CredentialEvent{Kind: EventRolled, Thumbprint: st.Binding, Replaced: r.bound.binding})
	r.bound.release()
	r.bound, r.rollDue = nil, nil
	r.showOnboarding()
}

// RollPending reports that st, not bound to the configured onboarding certificate, is one a
// roll keeps in force: it records the onboarding identity it is bound to, of the same
// registration ID (see run.keepBound, which also checks that it still loads).
func RollPending(st *storage.State, registrationID string) bool {
	return len(st.OnboardingChain) > 0 && st.OnboardingKey != "" && strings.EqualFold(st.RegistrationID, registrationID)
}

// releaseBound releases the identity kept for a pending roll, as the run ends.
func (r *run) releaseBound() {
	if r.bound != nil {
		r.bound.release()
	}
}

// Reload has the agent load its onboarding certificate and key again, as the configuration
// names them (SIGHUP, `systemctl reload unicity`; the agent also notices a new certificate
// file by itself). It returns once the loop has loaded them; the registration with a new
// certificate follows. An error says why the new certificate cannot be used (the one in use
// stays), or, marked ErrTemporary, that the agent is not ready for it.
func (a *Agent) Reload(ctx context.Context) error {
	_, err := a.ask(ctx, &request{reload: true, reply: make(chan result, 1)})
	return err
}

// watchOnboarding reloads the onboarding credential when its certificate file changes (a
// `unicity factory install` on the live device). A chain in TPM NV is reloaded on SIGHUP
// only.
func (a *Agent) watchOnboarding(ctx context.Context) {
	path := a.Config.Attestation.IdentityCert
	if a.OnboardingPoll <= 0 || a.Config.Attestation.Method != "x509" || strings.HasPrefix(path, "tpm-nv:") {
		return
	}
	last := stampOf(path)
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.Clock.After(a.OnboardingPoll):
		}
		if s := stampOf(path); s != last {
			last = s
			a.Reload(ctx) // the loop shows a certificate it cannot use
		}
	}
}

// fileStamp tells a replaced or rewritten file from the one seen before.
type fileStamp struct {
	size  int64
	mod   time.Time
	inode uint64
}

func stampOf(path string) fileStamp {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}
	}
	s := fileStamp{size: fi.Size(), mod: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.inode = st.Ino
	}
	return s
}
