package device

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/storage"
)

// Renewal of the operational certificate (certificates.md §2): DPS sends no expiry notice, so
// the agent asks for a new certificate, for a new TPM key, at [certificates] renew_at of the
// lifetime: through the hub it is connected to, or by a DPS registration with a CSR when the
// hub's path fails for good. The swap is transactional: the new credential is stored beside
// the one in force (State.Renewal) and replaces it only once the hub has accepted a
// connection with it; the old key is destroyed only then.

// Paths a renewal takes (storage.RenewalResult.Via).
const (
	ViaHub = "hub"
	ViaDPS = "dps"
)

// Renewal states (RenewalStatus.State).
const (
	// RenewalScheduled: the certificate is renewed at NextAt.
	RenewalScheduled = "scheduled"
	// RenewalRequesting: a new certificate has been asked for (Via says where).
	RenewalRequesting = "requesting"
	// RenewalVerifying: the agent connects to the hub with the new certificate, which
	// replaces the old one once the hub accepts it.
	RenewalVerifying = "verifying"
	// RenewalRetrying: the last attempt failed (Last says why); the next is at NextAt.
	RenewalRetrying = "retrying"
)

// RenewalStatus is where the renewal of the operational certificate stands, in the status,
// the local API and the twin.
type RenewalStatus struct {
	State  string    `json:"state"`
	NextAt time.Time `json:"next_at,omitzero"`
	// Via is the path of the attempt under way or next.
	Via string `json:"via,omitempty"`
	// Failures counts the attempts failed in a row.
	Failures int                    `json:"failures,omitempty"`
	Last     *storage.RenewalResult `json:"last,omitempty"`
}

// RenewalTime is when c is due for renewal under cc: at renew_at of its lifetime, moved by up
// to ± renew_jitter of it. The offset comes from c's own bytes, so that each certificate of a
// fleet gets its own time, and the same one at every start and in every command that shows it.
func RenewalTime(cc config.Certificates, c *x509.Certificate) time.Time {
	sum := sha256.Sum256(c.Raw)
	u := float64(binary.BigEndian.Uint64(sum[:8])) / (1 << 64) // in [0, 1)
	share := cc.RenewAt + cc.RenewJitter*(2*u-1)
	life := c.NotAfter.Sub(c.NotBefore)
	return c.NotBefore.Add(time.Duration(share * float64(life)))
}

const (
	// renewalHubTries is how many hub attempts in a row may fail before the next goes to DPS.
	renewalHubTries = 3
	// renewalRecheck bounds the wait for the renewal time, so that a clock that jumps (set by
	// NTP after boot) is noticed.
	renewalRecheck = time.Minute
)

// Kinds of CredentialEvent for renewal.
const (
	// EventRenewed: the renewed certificate is the hub's credential; the old key is destroyed.
	EventRenewed = "renewed"
	// EventRenewalFailed: an attempt failed (Reason); the certificate in force stays.
	EventRenewalFailed = "renewal_failed"
)

// renewal is the run's side of renewal: the credential on trial and the schedule.
type renewal struct {
	// candidate is the renewed credential on trial (State.Renewal), via the path it took.
	candidate *operational
	via       string
	// failures counts the attempts failed in a row, hubFailures those through the hub since
	// the last through DPS; hubBroken says the hub's path failed for good.
	failures, hubFailures int
	hubBroken             bool
	retryAt               time.Time
	requesting            string
	last                  *storage.RenewalResult
}

// certificateIssuer is a session that can ask the hub for a certificate.
type certificateIssuer interface {
	IssueCertificate(ctx context.Context, csr []byte, replace bool) ([][]byte, error)
}

// renewalDue is when the operational certificate is to be renewed next; zero when nothing
// is to be renewed (no operational certificate, or a renewed one on trial).
func (r *run) renewalDue() time.Time {
	switch {
	case r.op == nil, r.ren.candidate != nil:
		return time.Time{}
	case !r.ren.retryAt.IsZero():
		return r.ren.retryAt
	}
	return RenewalTime(r.a.Config.Certificates, r.op.id.Chain[0])
}

// renewalTimer fires when the renewal is due, or after renewalRecheck; nil when none is.
func (r *run) renewalTimer() <-chan time.Time {
	due := r.renewalDue()
	if due.IsZero() {
		return nil
	}
	return r.a.Clock.After(min(max(due.Sub(r.a.Clock.Now()), 0), renewalRecheck))
}

// nextVia is the path of the next attempt over sess.
func (r *run) nextVia(sess Session) string {
	if _, ok := sess.(certificateIssuer); !ok || r.ren.hubBroken || r.ren.hubFailures >= renewalHubTries {
		return ViaDPS
	}
	return ViaHub
}

// showRenewal puts where the renewal stands in the status; sess is the live session, nil
// between sessions (the path of the next attempt is then not known yet).
func (r *run) showRenewal(sess Session) {
	var rs *RenewalStatus
	if r.op != nil {
		rs = &RenewalStatus{State: RenewalScheduled, NextAt: r.renewalDue(), Failures: r.ren.failures, Last: r.ren.last}
		if sess != nil {
			rs.Via = r.nextVia(sess)
		}
		switch {
		case r.ren.candidate != nil:
			rs.State, rs.Via = RenewalVerifying, r.ren.via
		case r.ren.requesting != "":
			rs.State, rs.Via = RenewalRequesting, r.ren.requesting
		case r.ren.failures > 0:
			rs.State = RenewalRetrying
		}
	}
	r.a.setStatus(func(s *Status) { s.Renewal = rs })
}

// renew makes one attempt at renewing the operational certificate over the live session
// sess. It reports success, after which the session is to be closed: a renewed certificate
// waits to be tried, or (through DPS) another assignment is in force.
func (r *run) renew(ctx context.Context, sess Session) bool {
	via := r.nextVia(sess)
	r.ren.requesting = via
	r.showRenewal(sess)
	var err error
	if via == ViaHub {
		err = r.renewViaHub(ctx, sess.(certificateIssuer))
		if err != nil {
			r.ren.hubFailures++
			var ce *hub.CertificateError
			if errors.Is(err, hub.ErrRenewalOff) || errors.As(err, &ce) && !ce.Temporary() {
				r.ren.hubBroken = true
			}
		}
	} else {
		r.ren.hubFailures, r.ren.hubBroken = 0, false
		err = r.renewViaDPS(ctx)
	}
	r.ren.requesting = ""
	if err != nil && ctx.Err() != nil {
		return false // the agent is stopping: no failure to record
	}
	if err != nil {
		r.renewalFailed(ctx, via, err)
	}
	r.showRenewal(sess)
	return err == nil
}

// renewViaHub asks the hub for a certificate for a new key and puts it on trial.
func (r *run) renewViaHub(ctx context.Context, is certificateIssuer) error {
	key, err := r.newOperationalKey()
	if err != nil {
		return err
	}
	var op *operational
	err = r.a.bounded(ctx, func(ctx context.Context) error {
		csr, err := attest.CreateCSR(key, r.id.RegistrationID)
		if err != nil {
			return fmt.Errorf("cannot make the CSR: %w", err)
		}
		chain, err := is.IssueCertificate(ctx, csr, false)
		if errors.Is(err, hub.ErrOperationActive) {
			// One this agent gave up on before (a timeout, a restart): supersede it.
			chain, err = is.IssueCertificate(ctx, csr, true)
		}
		if err != nil {
			return err
		}
		op, err = issued(chain, key, r.a.Clock.Now())
		return err
	})
	if err != nil {
		key.Destroy() // nothing names it
		return err
	}
	base := *r.assignment
	r.propose(ctx, &base, op, ViaHub)
	return nil
}

// renewViaDPS registers with DPS for a certificate for a new key. The same assignment puts the
// new credential on trial; another one is a move, in force at once.
func (r *run) renewViaDPS(ctx context.Context) error {
	cur := r.assignment
	st, op, err := r.obtain(ctx, 1, r.a.Clock.Now())
	if err != nil {
		return err
	}
	if st.AssignedHub != cur.AssignedHub || !strings.EqualFold(st.DeviceID, cur.DeviceID) {
		r.swap(ctx, st, op)
		return nil
	}
	st.IssuedChain, st.OperationalKey, st.LastRenewal = cur.IssuedChain, cur.OperationalKey, cur.LastRenewal
	r.propose(ctx, st, op, ViaDPS)
	return nil
}

// propose stores base, the assignment in force, with op beside its credential as the renewed
// one on trial: a power cut from here on leaves both, and the next start tries op first.
func (r *run) propose(ctx context.Context, base *storage.State, op *operational, via string) {
	base.Renewal = &storage.Renewal{IssuedChain: rawChain(op.id.Chain), OperationalKey: op.spec(), Via: via, IssuedAt: r.a.Clock.Now()}
	r.store(ctx, base)
	r.inForce(base)
	r.ren.candidate, r.ren.via = op, via
}

// commitRenewal makes the credential on trial, which the hub just accepted, the one in force,
// and destroys the old key once the state naming the new one is stored.
func (r *run) commitRenewal(ctx context.Context) {
	cand, via := r.ren.candidate, r.ren.via
	st := *r.assignment
	old, oldThumb := st.OperationalKey, storedThumbprint(&st)
	thumb := certcodec.Thumbprint(cand.id.Chain[0])
	st.IssuedChain, st.OperationalKey, st.Renewal = st.Renewal.IssuedChain, st.Renewal.OperationalKey, nil
	st.LastRenewal = &storage.RenewalResult{At: r.a.Clock.Now(), Result: storage.Renewed, Via: via, Thumbprint: thumb}
	saved := r.store(ctx, &st)
	r.op.close()
	r.op = cand
	r.ren = renewal{last: st.LastRenewal}
	r.inForce(&st)
	if saved {
		r.destroyKey(old)
		r.storedKey = st.OperationalKey
	}
	r.showRenewal(nil)
	r.a.credentialEvent(CredentialEvent{Kind: EventRenewed, Via: via, Thumbprint: thumb, Replaced: oldThumb,
		NotAfter: cand.id.Chain[0].NotAfter, Key: cand.spec()})
}

// rejectRenewal drops the credential on trial, which the hub refused or which expired (why); the
// one in force stays.
func (r *run) rejectRenewal(ctx context.Context, why error) {
	cand, via := r.ren.candidate, r.ren.via
	st := *r.assignment
	st.Renewal = nil
	r.ren.candidate = nil
	cand.close()
	if r.store(ctx, &st) {
		r.destroyKey(cand.spec())
	}
	r.inForce(&st)
	r.renewalFailed(ctx, via, why)
	r.showRenewal(nil)
}

// renewalFailed schedules the next attempt after one that failed, and records the failure
// in the state when it is news (not the same error again), to spare the flash.
func (r *run) renewalFailed(ctx context.Context, via string, err error) {
	r.ren.failures++
	d := max(r.a.Backoff(r.ren.failures), retryAfter(err))
	var ce *hub.CertificateError
	if errors.As(err, &ce) {
		d = max(d, ce.RetryAfter)
	}
	if errors.Is(err, ErrRefused) {
		// DPS refused the device: asking again soon costs a billed registration each time.
		d = max(d, r.a.Config.Agent.ParkedRetry)
	}
	now := r.a.Clock.Now()
	r.ren.retryAt = now.Add(d)
	res := &storage.RenewalResult{At: now, Result: storage.RenewalFailed, Via: via, Error: err.Error()}
	news := r.ren.last == nil || r.ren.last.Result != res.Result || r.ren.last.Error != res.Error
	r.ren.last = res
	if news {
		st := *r.assignment
		st.LastRenewal = res
		r.store(ctx, &st)
		r.inForce(&st)
	}
	r.a.NoteError(fmt.Errorf("renewing the operational certificate through %s: %w", PathName(via), err))
	r.a.credentialEvent(CredentialEvent{Kind: EventRenewalFailed, Via: via, Reason: err.Error(),
		Replaced: certcodec.Thumbprint(r.op.id.Chain[0]), NotAfter: r.op.id.Chain[0].NotAfter})
}

// PathName names a renewal path (ViaHub, ViaDPS) in words.
func PathName(via string) string {
	if via == ViaDPS {
		return "DPS"
	}
	return "the hub"
}

func rawChain(chain []*x509.Certificate) [][]byte {
	ders := make([][]byte, len(chain))
	for i, c := range chain {
		ders[i] = c.Raw
	}
	return ders
}
