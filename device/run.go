package device

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/internal/backoff"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/storage"
)

// run is one run of the lifecycle, from the state lock to the end of Agent.Run. It owns what
// the lifecycle knows (the lock, the identity and its binding, the assignment in force, the
// phase) and changes it only through its methods, on the loop's goroutine; answer is the one
// place that decides what a request gets.
type run struct {
	a       *Agent
	lock    *storage.Locked
	creds   *Credentials
	id      *Identity
	binding string
	// op is the operational credential the hub is reached with, nil when the onboarding
	// identity is ([certificates] issuance = "none") or none is usable yet.
	op *operational
	// ren is the renewal of op: the renewed credential on trial and the schedule.
	ren renewal
	// unusable is the stored assignment whose operational credential could not be used at
	// the start: the registration that replaces it carries on its history (the replaced
	// thumbprint, the last renewal).
	unusable *storage.State
	// storedKey is the operational key the stored state names: destroyed only once a state
	// naming another is stored.
	storedKey string
	// assignment is the one in force, nil before the first. The loop writes it under a.mu
	// (inForce) and reads it freely; other goroutines read it under a.mu (Agent.Assignment).
	assignment *storage.State
	// phase is where the lifecycle is, as the status shows it; enter sets both.
	phase Phase
	// refusal is what a request gets in the phases that wait for the lock, the TPM or the
	// clock.
	refusal error
	// refused says why, while the run waits out the rate limit before registering again
	// because the hub refused the identity.
	refused string
	// pending are the requests the registration under way answers with its outcome.
	pending []*request
	// onboarding is an expired onboarding certificate and a pending roll (onboarding.go).
	onboarding
}

func (a *Agent) lifecycle(ctx context.Context) error {
	r := &run{a: a}
	a.mu.Lock()
	a.current = r
	a.mu.Unlock()

	if err := r.lockState(ctx); err != nil {
		return err
	}
	defer r.lock.Unlock()
	creds, err := r.openCredentials(ctx)
	if err != nil {
		return err
	}
	r.creds = creds
	defer func() {
		r.op.close()
		r.ren.candidate.close()
		r.releaseBound()
		r.creds.Close() // the latest (onboarding.go: reload), holding the TPM
	}()
	if err := r.awaitIdentity(ctx, creds); err != nil {
		return err
	}
	r.binding = creds.StateBinding()

	firstBoot, err := r.loadState(ctx)
	if err != nil {
		return err
	}
	for {
		if r.assignment == nil {
			if err := r.provision(ctx, firstBoot); err != nil {
				return err
			}
			firstBoot = false
		}
		if err := r.serve(ctx); err != nil {
			return err
		}
	}
}

// enter moves the run to phase, applying change to the status with it.
func (r *run) enter(phase Phase, change func(*Status)) {
	r.phase = phase
	r.a.setStatus(func(s *Status) {
		s.Phase = phase
		change(s)
	})
}

// inForce makes st the assignment in force, in the status too.
func (r *run) inForce(st *storage.State) {
	r.a.setStatus(func(s *Status) {
		s.AssignedHub, s.DeviceID = st.AssignedHub, st.DeviceID
		r.assignment = st // setStatus holds a.mu
	})
}

// answer answers a request, or keeps it for the registration under way to answer, as the
// phase and the state decide. registered reports that the request made a registration; err
// is that registration's failure (the assignment in force then stays).
func (r *run) answer(ctx context.Context, req *request) (registered bool, err error) {
	if req.reload {
		req.reply <- result{err: r.reload()}
		return false, nil
	}
	switch r.phase {
	case PhaseWaitingLock, PhaseWaitingTPM, PhaseWaitingClock:
		req.reply <- result{err: r.refusal}
		return false, nil
	case PhaseProvisioning, PhaseParked:
		if r.refused == "" {
			r.pending = append(r.pending, req)
			return false, nil
		}
		if req.ProvisionOnly {
			req.reply <- result{err: Mark(fmt.Errorf("%s; the agent is about to register again", r.refused), ErrTemporary)}
			return false, nil
		}
		r.a.setStatus(func(s *Status) {
			s.NextRetry = time.Time{}
			s.Message = fmt.Sprintf("registering %s with DPS again, as asked", r.id.RegistrationID)
		})
		return true, r.registerAsked(ctx, req)
	}
	// Connecting or connected: the assignment in force stays until a new one replaces it.
	st := r.assignment
	if req.ProvisionOnly {
		req.reply <- result{state: st}
		return false, nil
	}
	if !req.Force && !r.mayReprovision() {
		req.reply <- result{err: checkRateLimit(r.a.Config.Agent, st, r.a.Clock.Now())}
		return false, nil
	}
	r.a.setStatus(func(s *Status) {
		s.Message = fmt.Sprintf("registering %s with DPS again, as asked; %s stays in force until then", r.id.RegistrationID, st.AssignedHub)
	})
	if err := r.registerAsked(ctx, req); err != nil {
		r.a.NoteError(fmt.Errorf("registering again: %w", err))
		return true, err
	}
	return true, nil
}

// registerAsked makes the registration req asked for and answers it with the outcome. A new
// assignment is shown as being connected to before the answer goes, so that whoever asked
// and then reads the status does not see the old connection as the new one's.
func (r *run) registerAsked(ctx context.Context, req *request) error {
	req.begin()
	st, err := r.register(ctx, 1, r.a.Clock.Now())
	if err == nil {
		r.connecting(st)
	}
	req.reply <- result{state: st, err: err}
	return err
}

// connecting enters the connecting phase for the hub st names.
func (r *run) connecting(st *storage.State) {
	r.enter(PhaseConnecting, func(s *Status) {
		s.NextRetry, s.ConnectedSince = time.Time{}, time.Time{}
		s.Message = fmt.Sprintf("connecting to %s as %s", st.AssignedHub, st.DeviceID)
	})
}

// answerPending answers the requests kept for the registration under way.
func (r *run) answerPending(res result) {
	for _, req := range r.pending {
		req.reply <- res
	}
	r.pending = nil
}

// lockState takes the state lock, waiting while a command run by hand holds it.
func (r *run) lockState(ctx context.Context) error {
	l, err := r.a.tryLock()
	if !errors.Is(err, storage.ErrLocked) {
		r.lock = l
		return err
	}
	r.refusal = Mark(errors.New("the agent is waiting for the state lock"), ErrTemporary)
	r.enter(PhaseWaitingLock, func(s *Status) {
		s.Message = "waiting for the provisioning state, locked by another unicity process"
	})
	for {
		if req, err := r.a.pause(ctx, clockPoll); err != nil {
			return err
		} else if req != nil {
			r.answer(ctx, req)
		}
		l, err := r.a.tryLock()
		if !errors.Is(err, storage.ErrLocked) {
			r.lock = l
			return err
		}
	}
}

// tryLock takes the state lock. On a read-only state directory it takes it read-only: the
// stored assignment serves this boot, and a new one is kept in memory (see run.store).
func (a *Agent) tryLock() (*storage.Locked, error) {
	l, err := a.Store.TryLock()
	if !errors.Is(err, storage.ErrReadOnly) {
		return l, err
	}
	l, rerr := a.Store.TryLockReadOnly()
	if rerr != nil {
		return nil, err
	}
	a.NoteError(fmt.Errorf("%w: the stored assignment is used, a new one could not be stored", err))
	return l, nil
}

// openCredentials opens the identity, waiting for a TPM that does not exist or answer yet.
func (r *run) openCredentials(ctx context.Context) (*Credentials, error) {
	r.enter(PhaseLoading, func(s *Status) { s.Message = "loading the device identity" })
	for attempt := 1; ; attempt++ {
		done := r.a.covered(identityLoadBound)
		creds, err := r.a.Credentials(ctx, r.a.Config)
		done()
		if err == nil {
			return creds, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if errors.Is(err, ErrIdentity) || isConfigError(err) {
			return nil, err
		}
		what, d := "waiting for the TPM", r.a.Backoff(attempt)
		if TPMAbsent(err) {
			what, d = "waiting for the TPM to appear", tpmDevicePoll
		}
		r.refusal = Mark(fmt.Errorf("the agent is not ready: %s: %w", what, err), ErrTemporary)
		req, werr := r.retryLater(ctx, PhaseWaitingTPM, what, err, attempt, d)
		if werr != nil {
			return nil, werr
		}
		if req != nil {
			r.answer(ctx, req)
		}
	}
}

// awaitIdentity waits until the clock is plausible for the identity, then checks it. An
// expired certificate is taken (see onboarding.go), for what needs no DPS.
func (r *run) awaitIdentity(ctx context.Context, creds *Credentials) error {
	validFrom := creds.ValidFrom()
	r.refusal = Mark(errors.New("the agent is waiting for a valid clock"), ErrTemporary)
	for {
		now := r.a.Clock.Now()
		if !now.Before(validFrom) {
			id, expired, err := checkOnboarding(creds, now)
			if err == nil {
				r.takeIdentity(id, expired)
				return nil
			}
			if !errors.Is(err, attest.ErrClockNotSet) {
				return err
			}
		}
		r.enter(PhaseWaitingClock, func(s *Status) {
			// The date only: a message that changed every second would flood the log.
			s.Message = fmt.Sprintf("waiting for a valid clock: it says %s, the identity is valid from %s",
				now.UTC().Format(time.DateOnly), validFrom.UTC().Format(time.RFC3339))
		})
		req, err := r.a.pause(ctx, clockPoll)
		if err != nil {
			return err
		}
		if req != nil {
			r.answer(ctx, req)
		}
	}
}

// loadState puts the stored assignment in force if it belongs to this identity. firstBoot
// reports that the device never registered (as opposed to a state that had to be
// discarded). It fails only when ctx ends.
func (r *run) loadState(ctx context.Context) (firstBoot bool, err error) {
	st, err := r.lock.Load()
	switch {
	case errors.Is(err, storage.ErrNotExist):
		return true, nil
	case err != nil:
		r.a.NoteError(fmt.Errorf("registering again: %w", err))
		return false, nil
	case !st.BelongsTo(r.id.RegistrationID, r.binding) && !r.keepBound(st):
		r.collectKeys()
		r.a.NoteError(fmt.Errorf("registering again: the stored assignment belongs to another identity (%s, certificate %s)", st.RegistrationID, st.Binding))
		return false, nil
	}
	r.storedKey = st.OperationalKey
	r.collectKeys(st.OperationalKeys()...)
	if r.issuing() {
		op, err := r.loadCredentials(ctx, st)
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		if err != nil {
			r.unusable = st
			r.setCredential(CredentialNeeded)
			r.a.credentialEvent(CredentialEvent{Kind: EventFellBack, Reason: err.Error(), Replaced: storedThumbprint(st)})
			r.a.NoteError(fmt.Errorf("registering again with the onboarding identity: %w", err))
			return false, nil
		}
		r.op = op
	}
	r.inForce(st)
	r.recordInForce() // best effort: a read-only state directory keeps its file as it is
	r.setCredential(r.credential())
	r.showRenewal(nil)
	return false, nil
}

func (r *run) issuing() bool { return r.a.Config.Certificates.Issued() }

// credential is which credential the hub is reached with now.
func (r *run) credential() CredentialState {
	switch {
	case r.op != nil:
		return CredentialOperational
	case r.issuing():
		return CredentialNeeded
	}
	return CredentialOnboarding
}

func (r *run) setCredential(c CredentialState) {
	r.a.setStatus(func(s *Status) { s.Credential = c })
}

// hubIdentity is what the hub is reached with: a renewed credential on trial, else the
// operational credential when there is one.
func (r *run) hubIdentity() *Identity {
	id := r.id
	if r.bound != nil {
		id = r.bound.id
	}
	op := r.op
	if r.ren.candidate != nil {
		op = r.ren.candidate
	}
	if op == nil {
		return id
	}
	return &Identity{RegistrationID: id.RegistrationID, X509: op.id}
}

// provision registers until DPS assigns a hub, then stores the assignment and puts it in
// force. When registering again, the assignment in force stays stored until the new one
// replaces it.
func (r *run) provision(ctx context.Context, firstBoot bool) error {
	r.refused = ""
	defer r.answerPending(result{err: Mark(errors.New("the agent is stopping"), ErrTemporary)})

	if firstBoot && r.a.Config.Agent.FirstBootDelay > 0 {
		d := backoff.Jitter(r.a.Config.Agent.FirstBootDelay)
		r.enter(PhaseProvisioning, func(s *Status) {
			s.NextRetry = r.a.Clock.Now().Add(d)
			s.Message = fmt.Sprintf("first boot: waiting %s before registering with DPS, to spread the fleet's registrations", d.Round(time.Second))
		})
		if req, err := r.a.pause(ctx, d); err != nil {
			return err
		} else if req != nil {
			r.answer(ctx, req) // kept for the registration
		}
	}

	start := r.a.Clock.Now()
	failures := 0
	for attempt := 1; ; attempt++ {
		r.enter(PhaseProvisioning, func(s *Status) {
			s.NextRetry = time.Time{}
			s.Message = fmt.Sprintf("registering %s with DPS (attempt %d)", r.id.RegistrationID, attempt)
		})
		for _, req := range r.pending {
			req.begin()
		}
		st, err := r.register(ctx, attempt, start)
		if err == nil {
			r.answerPending(result{state: st})
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.answerPending(result{err: err})
		failures++

		var req *request
		if errors.Is(err, ErrRefused) || errors.Is(err, ErrOnboardingExpired) {
			req, err = r.park(ctx, err)
			failures = 0
		} else {
			d := max(r.a.Backoff(failures), retryAfter(err))
			req, err = r.retryLater(ctx, PhaseProvisioning, "cannot register with DPS", err, failures, d)
		}
		if err != nil {
			return err
		}
		if req != nil {
			r.answer(ctx, req) // kept for the next attempt, which starts now
		}
	}
}

// register makes attempt number attempt of a registration that began at start, stores its
// result (see store) and puts it in force.
func (r *run) register(ctx context.Context, attempt int, start time.Time) (*storage.State, error) {
	st, op, err := r.obtain(ctx, attempt, start)
	if err != nil {
		return nil, err
	}
	r.swap(ctx, st, op)
	return st, nil
}

// obtain makes attempt number attempt of a registration that began at start. With issuance
// on, the registration sends a CSR for a new key, and op is the certificate DPS issued for it.
// A registration DPS accepts with a new onboarding certificate ends a pending roll.
func (r *run) obtain(ctx context.Context, attempt int, start time.Time) (st *storage.State, op *operational, err error) {
	if err := r.onboardingUsable(); err != nil {
		return nil, nil, err
	}
	st, op, err = r.obtainAs(ctx, r.id, r.binding, attempt, start)
	if err == nil {
		r.recordIdentity(st, r.id, r.creds.Key)
		r.rolledOnto(st)
		return st, op, nil
	}
	if b := r.bound; b != nil && !r.rolling && errors.Is(err, ErrRefused) {
		// A roll is pending and DPS does not take the new onboarding certificate yet: what
		// this registration is for (the hub moved or forgot the device, a renewal) is done
		// with the one the assignment is bound to, which it still takes.
		var berr error
		if st, op, berr = r.obtainAs(ctx, b.id, b.binding, attempt, start); berr == nil {
			r.recordIdentity(st, b.id, b.key)
			return st, op, nil
		}
		err = fmt.Errorf("%w; with the onboarding certificate before it: %w", err, berr)
	}
	return nil, nil, err
}

// obtainAs makes one registration with the onboarding identity id, bound to binding.
func (r *run) obtainAs(ctx context.Context, id *Identity, binding string, attempt int, start time.Time) (st *storage.State, op *operational, err error) {
	var key *attest.Key
	if r.issuing() {
		if key, err = r.newOperationalKey(); err != nil {
			return nil, nil, err
		}
	}
	err = r.a.bounded(ctx, func(ctx context.Context) error {
		var err error
		st, op, err = registerCSR(ctx, r.a.Provisioner, id, key, binding, r.assignment, r.a.Clock.Now, attempt, start)
		return err
	})
	return st, op, err
}

// swap stores st, a new assignment, and puts it in force with op, the certificate issued
// with it (nil without issuance). The key of the one it replaces is destroyed once st is
// stored, and so is a renewed one on trial.
func (r *run) swap(ctx context.Context, st *storage.State, op *operational) {
	prev := r.assignment
	if prev == nil {
		prev = r.unusable
	}
	r.unusable = nil
	if prev != nil {
		st.LastRenewal = prev.LastRenewal
	}
	saved := r.store(ctx, st)
	if op != nil {
		r.a.credentialEvent(CredentialEvent{Kind: EventIssued, Thumbprint: certcodec.Thumbprint(op.id.Chain[0]),
			Replaced: storedThumbprint(prev), NotAfter: op.id.Chain[0].NotAfter, Key: op.spec()})
	}
	if cand := r.ren.candidate; cand != nil {
		cand.close()
		if saved {
			r.destroyKey(cand.spec())
		}
	}
	r.ren = renewal{last: st.LastRenewal}
	r.op.close()
	r.op = op
	r.inForce(st)
	r.setCredential(r.credential())
	r.showRenewal(nil)
	if saved && r.storedKey != st.OperationalKey {
		r.destroyKey(r.storedKey)
		r.storedKey = st.OperationalKey
	}
}

// registerBound makes one registration and binds the assignment to the identity.
func registerBound(ctx context.Context, p Provisioner, id *Identity, binding string, prev *storage.State, now func() time.Time, attempt int, start time.Time) (*storage.State, error) {
	st, err := p.Register(ctx, id, prev)
	if err != nil {
		return nil, err
	}
	st.RegistrationID, st.Binding = id.RegistrationID, binding
	st.ProvisionedAt = now()
	st.Attempts, st.Duration = attempt, st.ProvisionedAt.Sub(start)
	return st, nil
}

// registerCSR makes one registration, with a CSR for key when there is one (issuance), and
// binds the assignment to the identity; op is the certificate DPS issued for key. On failure
// key is destroyed: nothing names it.
func registerCSR(ctx context.Context, p Provisioner, id *Identity, key *attest.Key, binding string, prev *storage.State, now func() time.Time, attempt int, start time.Time) (*storage.State, *operational, error) {
	reg := id
	if key != nil {
		csr := *id
		csr.CSR = key
		reg = &csr
	}
	st, err := registerBound(ctx, p, reg, binding, prev, now, attempt, start)
	var op *operational
	if err == nil && key != nil {
		if op, err = issued(st.IssuedChain, key, now()); err == nil {
			st.OperationalKey = op.spec()
		}
	}
	if err != nil {
		if key != nil {
			key.Destroy()
		}
		return nil, nil, err
	}
	return st, op, nil
}

// store saves a new assignment. One the disk refuses (full, read-only) is used all the same
// for this boot, and its write retried with backoff until it succeeds or a newer assignment
// replaces it: registering again cannot cure a disk, and each registration is billed and
// counted against the DPS quota. The status shows the refusal meanwhile (StoreError).
// It reports whether st is stored.
func (r *run) store(ctx context.Context, st *storage.State) (saved bool) {
	a := r.a
	a.saveMu.Lock()
	a.saves++
	n := a.saves
	err := r.lock.Save(st)
	a.saveMu.Unlock()
	if err == nil {
		a.setStatus(func(s *Status) { s.StoreError = "" })
		return true
	}
	err = fmt.Errorf("%w; the assignment is in use but not stored, and the write is retried", err)
	a.setStatus(func(s *Status) { s.StoreError, s.LastError, s.LastErrorAt = err.Error(), err.Error(), a.Clock.Now() })
	a.bg.Go(func() { r.retryStore(ctx, st, n) })
	return false
}

// retryStore writes st, the n'th assignment saved, with backoff until it is stored or a newer
// one was saved. It runs beside the loop: it touches only the lock and the Agent's save
// counter.
func (r *run) retryStore(ctx context.Context, st *storage.State, n int) {
	a := r.a
	for attempt := 1; ; attempt++ {
		select {
		case <-ctx.Done():
			return
		case <-a.Clock.After(a.Backoff(attempt)):
		}
		a.saveMu.Lock()
		if a.saves != n {
			a.saveMu.Unlock()
			return
		}
		err := r.lock.Save(st)
		a.saveMu.Unlock()
		if err == nil {
			a.setStatus(func(s *Status) { s.StoreError = "" })
			return
		}
	}
}

// park waits out a permanent refusal on the slow retry, or until someone asks for a
// registration (the enrollment was fixed).
func (r *run) park(ctx context.Context, cause error) (*request, error) {
	next := r.a.Clock.Now().Add(r.a.Config.Agent.ParkedRetry)
	r.a.markReady()
	r.enter(PhaseParked, func(s *Status) {
		s.NextRetry, s.Attempts = next, 0
		s.Message = fmt.Sprintf("parked: DPS refused the device (%v); next try at %s, or run `unicity reprovision` once fixed", cause, next.UTC().Format(time.RFC3339))
		if errors.Is(cause, ErrOnboardingExpired) {
			s.Message = fmt.Sprintf("parked: %v", cause)
		}
		s.LastError, s.LastErrorAt = cause.Error(), r.a.Clock.Now()
	})
	return r.a.pause(ctx, r.a.Config.Agent.ParkedRetry)
}

// serve keeps the device connected to the hub of the assignment in force. It returns nil
// once another assignment is in force (the device registered again).
func (r *run) serve(ctx context.Context) error {
	failures := 0
	for {
		st := r.assignment
		now := r.a.Clock.Now()
		if cand := r.ren.candidate; cand != nil && !now.Before(cand.id.Chain[0].NotAfter) {
			r.rejectRenewal(ctx, fmt.Errorf("the renewed certificate %s expired before the hub accepted it", certcodec.Thumbprint(cand.id.Chain[0])))
		}
		if r.op != nil && r.ren.candidate == nil && !now.Before(r.op.id.Chain[0].NotAfter) {
			why := fmt.Sprintf("%v at %s", ErrOperationalExpired, r.op.id.Chain[0].NotAfter.UTC().Format(time.RFC3339))
			r.dropOperational(why)
			return r.reprovision(ctx, why)
		}
		r.connecting(st)
		trial := r.ren.candidate
		var sess Session
		err := r.a.bounded(ctx, func(ctx context.Context) error {
			var err error
			sess, err = r.a.Hub.Connect(ctx, r.hubIdentity(), st)
			return err
		})
		if trial != nil {
			switch {
			case err == nil:
				r.commitRenewal(ctx)
			case errors.Is(err, ErrIdentityRejected):
				r.rejectRenewal(ctx, fmt.Errorf("%s refused the renewed certificate %s: %w", st.AssignedHub, certcodec.Thumbprint(trial.id.Chain[0]), err))
				continue
			}
		}
		if err == nil {
			end, serr := r.connected(ctx, sess)
			switch {
			case serr != nil:
				return serr
			case end == sessionRegistered:
				return nil
			case end == sessionRenewed:
				failures = 0
				continue
			}
			err = sess.Err()
			failures = 0
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		failures++
		if errors.Is(err, ErrStale) {
			// The session already retried the hub that many times.
			failures = max(failures, r.a.Config.Agent.HubFailures)
		}
		if errors.Is(err, ErrIdentityRejected) {
			r.a.NoteError(err)
			if r.op != nil {
				// Revoked, or expired by the hub's clock: only a new one helps.
				why := fmt.Sprintf("%s refused the operational certificate", st.AssignedHub)
				r.dropOperational(why)
				return r.reprovision(ctx, why)
			}
			return r.reprovision(ctx, fmt.Sprintf("%s refused the identity", st.AssignedHub))
		}
		if failures >= r.a.Config.Agent.HubFailures && r.mayReprovision() {
			r.a.NoteError(err)
			r.enter(PhaseProvisioning, func(s *Status) {
				s.NextRetry = time.Time{}
				s.Message = fmt.Sprintf("%s could not be reached %d times in a row; asking DPS whether the assignment changed", st.AssignedHub, failures)
			})
			failures = 0
			_, rerr := r.register(ctx, 1, r.a.Clock.Now())
			if rerr == nil {
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			err = fmt.Errorf("%w; registering again with DPS failed too: %w", err, rerr)
		}
		req, werr := r.retryLater(ctx, PhaseConnecting, "cannot connect to "+st.AssignedHub, err, failures, r.a.Backoff(failures))
		if werr != nil {
			return werr
		}
		if req != nil {
			if registered, rerr := r.answer(ctx, req); registered && rerr == nil {
				return nil
			}
		}
	}
}

// How a session ended (connected).
type sessionEnd int

const (
	// sessionLost: the connection was lost.
	sessionLost sessionEnd = iota
	// sessionRegistered: the device registered again; another assignment is in force.
	sessionRegistered
	// sessionRenewed: a renewal wants a new connection: with a renewed certificate to try,
	// or to another hub.
	sessionRenewed
)

// connected waits on a live session, renewing the operational certificate when it is due.
func (r *run) connected(ctx context.Context, sess Session) (sessionEnd, error) {
	defer sess.Close()
	now := r.a.Clock.Now()
	st := r.assignment
	r.a.markReady()
	r.enter(PhaseConnected, func(s *Status) {
		s.NextRetry, s.Attempts, s.ConnectedSince = time.Time{}, 0, now
		s.Message = fmt.Sprintf("connected to %s as %s", st.AssignedHub, st.DeviceID)
	})
	r.showRenewal(sess)
	// Armed again only when the schedule may have moved: a watchdog ping moves nothing.
	renewal := r.renewalTimer()
	for {
		select {
		case <-ctx.Done():
			return sessionLost, ctx.Err()
		case <-sess.Done():
			return sessionLost, nil
		case p := <-r.a.pings:
			close(p)
		case <-renewal:
			if due := r.renewalDue(); !due.IsZero() && !r.a.Clock.Now().Before(due) && r.renew(ctx, sess) {
				return sessionRenewed, nil
			}
			renewal = r.renewalTimer()
		case req := <-r.a.requests:
			if registered, err := r.answer(ctx, req); registered && err == nil {
				return sessionRegistered, nil
			}
			renewal = r.renewalTimer()
		case <-r.rollDue:
			if r.tryRoll(ctx) {
				return sessionRegistered, nil
			}
			renewal = r.renewalTimer()
		}
	}
}

// reprovision registers again because the hub refused the identity: the assignment in force
// is useless, so it keeps trying, paced by the rate limit, then by the usual backoff,
// parking on refusals. A request by hand skips the rate limit.
func (r *run) reprovision(ctx context.Context, why string) error {
	st := r.assignment
	r.refused = why
	defer func() { r.refused = "" }()
	for {
		wait := st.ProvisionedAt.Add(r.a.Config.Agent.ReprovisionInterval).Sub(r.a.Clock.Now())
		if wait <= 0 {
			return r.provision(ctx, false)
		}
		next := r.a.Clock.Now().Add(wait)
		r.enter(PhaseProvisioning, func(s *Status) {
			s.NextRetry = next
			s.Message = fmt.Sprintf("%s; registering again with DPS at %s (at most one registration per %s)", why, next.UTC().Format(time.RFC3339), r.a.Config.Agent.ReprovisionInterval)
		})
		req, err := r.a.pause(ctx, wait)
		if err != nil {
			return err
		}
		if req == nil {
			continue
		}
		registered, err := r.answer(ctx, req)
		if !registered {
			continue
		}
		if err == nil {
			return nil
		}
		return r.provision(ctx, false)
	}
}

func (r *run) mayReprovision() bool {
	return checkRateLimit(r.a.Config.Agent, r.assignment, r.a.Clock.Now()) == nil
}

// checkRateLimit refuses a registration sooner than [agent] reprovision_interval after the
// one that produced st, with a *RateLimitError.
func checkRateLimit(pol config.AgentConfig, st *storage.State, now time.Time) error {
	next := st.ProvisionedAt.Add(pol.ReprovisionInterval)
	if !now.Before(next) {
		return nil
	}
	return &RateLimitError{Last: st.ProvisionedAt, Next: next, Interval: pol.ReprovisionInterval}
}

// retryLater records err, enters phase and waits d. It returns early with a request that
// arrived, for answer.
func (r *run) retryLater(ctx context.Context, phase Phase, what string, err error, attempt int, d time.Duration) (*request, error) {
	next := r.a.Clock.Now().Add(d)
	r.enter(phase, func(s *Status) {
		s.NextRetry, s.Attempts = next, attempt
		s.Message = fmt.Sprintf("%s: %v; retrying in %s", what, err, d.Round(100*time.Millisecond))
		s.LastError, s.LastErrorAt = err.Error(), r.a.Clock.Now()
	})
	return r.a.pause(ctx, d)
}
