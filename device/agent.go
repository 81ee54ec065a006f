package device

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/backoff"
	"github.com/unicity-iot/unicity/storage"
)

// Provisioner registers the device with DPS: one registration, with the polls and retries
// that belong to one call. It returns the assignment as it is to be stored (the agent fills in
// the identity binding and the times). Failures are marked with ErrRefused, ErrUnreachable or
// ErrTemporary, and wrapped in a *RetryAfterError when DPS said when to come back.
type Provisioner interface {
	Register(ctx context.Context, id *Identity, prev *storage.State) (*storage.State, error)
}

// Hub opens sessions with the assigned IoT Hub.
type Hub interface {
	// Connect returns once the session is up, or fails; a refused identity is marked
	// ErrIdentityRejected, an unreachable hub ErrUnreachable.
	Connect(ctx context.Context, id *Identity, st *storage.State) (Session, error)
}

// Session is one live connection to the hub.
type Session interface {
	// Done is closed when the connection is lost for good; Err then tells why.
	Done() <-chan struct{}
	Err() error
	Close() error
}

// Notifier passes state lines to the service manager (systemd's sd_notify protocol).
type Notifier interface {
	Notify(state string)
}

// Agent is the lifecycle of the device agent: from power-on to a live hub connection, and
// back to DPS when the hub no longer knows the device. Run it once; it returns only when ctx
// ends or the configuration or identity is unusable (an error marked ErrIdentity, or a
// *config.Error).
type Agent struct {
	Config      *config.Config
	Store       *storage.Store
	Provisioner Provisioner
	Hub         Hub

	// Optional.
	Credentials func(context.Context, *config.Config) (*Credentials, error) // default OpenCredentials
	Clock       Clock                                                       // default SystemClock
	Backoff     hub.Backoff                                                 // default backoff.FullJitter over the [agent] retry bounds
	Notifier    Notifier                                                    // default: none
	// Watchdog is systemd's watchdog period (WATCHDOG_USEC); zero disables the pings.
	Watchdog time.Duration
	// AttemptTimeout bounds one registration or one connection attempt.
	AttemptTimeout time.Duration
	// OnStatus is called after every change of the status, for the service's log. It runs
	// under the status lock: it must not call back into the Agent.
	OnStatus func(Status)
	// Services run beside the lifecycle for as long as Run runs (the local API, the gateway
	// relay); Run returns once they have. They reach the agent through its exported methods
	// (Status, Subscribe, Register, Assignment, NoteError).
	Services []func(context.Context)

	mu     sync.Mutex
	status Status
	// assignment is the one in force (nil before the first); see Assignment.
	assignment *storage.State
	subs       map[chan Status]struct{}
	ready      atomic.Bool // READY=1 sent
	// statusFailed is set once writing the status file failed.
	statusFailed bool
	requests     chan *request
	pings        chan chan struct{}
	// busyUntil (unix nanoseconds) covers the watchdog while the loop is inside a bounded
	// call rather than in one of its selects.
	busyUntil atomic.Int64
	// bg tracks the goroutines Run starts; they end with Run's context.
	bg sync.WaitGroup
	// saveMu orders the writes of assignments; saves counts them, so that the retried
	// write of an assignment the disk refused gives up once a newer one is saved.
	saveMu sync.Mutex
	saves  int
}

// Request is a registration asked for from outside the loop (the local API, the
// unicity.reprovision method).
type Request struct {
	// Force ignores the rate limit ([agent] reprovision_interval).
	Force bool
	// ProvisionOnly registers only a device that has no assignment yet; one that has is
	// answered with it.
	ProvisionOnly bool
	// Started, when set, is called once the loop begins the registration: until then the
	// answer is a refusal or the assignment in force, after it the registration's outcome.
	Started func()
}

// request is a Request on its way through the loop.
type request struct {
	Request
	reply     chan result
	startOnce sync.Once
}

// begin tells the requester that its registration is under way.
func (r *request) begin() {
	if r.Started != nil {
		r.startOnce.Do(r.Started)
	}
}

type result struct {
	state *storage.State
	err   error
}

const (
	defaultAttemptTimeout = 2 * time.Minute
	clockPoll             = time.Second
	// tpmDevicePoll is how often the agent looks for a TPM device or socket that does not
	// exist yet (a driver that loads late): a stat, which costs nothing.
	tpmDevicePoll = 10 * time.Second
	// identityLoadBound covers the watchdog while the identity loads: a storage root key
	// made (within attest.KeyGenerationTimeout) and a handful of other TPM commands (each
	// within attest.CommandTimeout), the first that overruns ending the attempt. A load
	// that takes longer is a TPM wedged in a way no deadline catches: the pings stop, and
	// systemd restarts the agent.
	identityLoadBound = attest.KeyGenerationTimeout + 12*attest.CommandTimeout
)

func (a *Agent) init() {
	if a.Credentials == nil {
		a.Credentials = OpenCredentials
	}
	if a.Clock == nil {
		a.Clock = SystemClock{}
	}
	if a.Backoff == nil {
		a.Backoff = backoff.FullJitter(a.Config.Agent.RetryMin, a.Config.Agent.RetryMax)
	}
	if a.AttemptTimeout == 0 {
		a.AttemptTimeout = defaultAttemptTimeout
	}
	a.requests = make(chan *request)
	a.pings = make(chan chan struct{})
	a.mu.Lock()
	a.subs = map[chan Status]struct{}{}
	a.status = Status{Phase: PhaseStarting, Message: "starting", PID: os.Getpid()}
	a.mu.Unlock()
}

// Run runs the agent until ctx ends (returning nil) or the configuration or identity turns
// out unusable.
func (a *Agent) Run(ctx context.Context) error {
	a.init()
	ctx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		a.bg.Wait()
	}()
	if a.Watchdog > 0 && a.Notifier != nil {
		a.bg.Go(func() { a.watchdog(ctx) })
	}
	for _, service := range a.Services {
		a.bg.Go(func() { service(ctx) })
	}
	a.setStatus(func(s *Status) { s.Phase, s.Message = PhaseStarting, "starting" })

	err := a.run(ctx)
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		err = nil // asked to stop: not a failure
	}
	cancel()
	if a.Notifier != nil {
		a.Notifier.Notify("STOPPING=1")
	}
	msg := "stopped"
	if err != nil {
		msg = "stopped: " + err.Error()
	}
	a.setStatus(func(s *Status) {
		s.Phase, s.Message, s.NextRetry = PhaseStopped, msg, time.Time{}
		if err != nil {
			s.LastError, s.LastErrorAt = err.Error(), a.Clock.Now()
		}
	})
	return err
}

func isConfigError(err error) bool {
	var ce *config.Error
	return errors.As(err, &ce)
}

func (a *Agent) run(ctx context.Context) error {
	lock, err := a.lockState(ctx)
	if err != nil {
		return err
	}
	defer lock.Unlock()

	creds, err := a.openCredentials(ctx)
	if err != nil {
		return err
	}
	defer creds.Close()
	id, err := a.awaitIdentity(ctx, creds)
	if err != nil {
		return err
	}
	a.setStatus(func(s *Status) { s.RegistrationID = id.RegistrationID })
	thumb := creds.StateBinding()

	st, firstBoot := a.loadState(lock, id, thumb)
	for {
		if st == nil {
			if st, err = a.provision(ctx, lock, id, thumb, nil, firstBoot); err != nil {
				return err
			}
			firstBoot = false
		}
		if st, err = a.serve(ctx, lock, id, thumb, st); err != nil {
			return err
		}
	}
}

// lockState takes the state lock, waiting while a command run by hand holds it.
func (a *Agent) lockState(ctx context.Context) (*storage.Locked, error) {
	l, err := a.tryLock()
	if !errors.Is(err, storage.ErrLocked) {
		return l, err
	}
	a.setStatus(func(s *Status) {
		s.Phase, s.Message = PhaseWaitingLock, "waiting for the provisioning state, locked by another unicity process"
	})
	for {
		if req, err := a.pause(ctx, clockPoll); err != nil {
			return nil, err
		} else if req != nil {
			req.reply <- result{err: Mark(errors.New("the agent is waiting for the state lock"), ErrTemporary)}
		}
		l, err := a.tryLock()
		if !errors.Is(err, storage.ErrLocked) {
			return l, err
		}
	}
}

// tryLock takes the state lock. On a read-only state directory it takes it read-only: the
// stored assignment serves this boot, and a new one is kept in memory (see store).
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
func (a *Agent) openCredentials(ctx context.Context) (*Credentials, error) {
	a.setStatus(func(s *Status) { s.Phase, s.Message = PhaseLoading, "loading the device identity" })
	for attempt := 1; ; attempt++ {
		done := a.covered(identityLoadBound)
		creds, err := a.Credentials(ctx, a.Config)
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
		what, d := "waiting for the TPM", a.Backoff(attempt)
		if TPMAbsent(err) {
			what, d = "waiting for the TPM to appear", tpmDevicePoll
		}
		if err := a.retryLater(ctx, PhaseWaitingTPM, what, err, attempt, d); err != nil {
			return nil, err
		}
	}
}

// awaitIdentity waits until the clock is plausible for the identity, then checks it.
func (a *Agent) awaitIdentity(ctx context.Context, creds *Credentials) (*Identity, error) {
	validFrom := creds.ValidFrom()
	for {
		now := a.Clock.Now()
		if !now.Before(validFrom) {
			id, err := creds.Identity(now)
			if !errors.Is(err, attest.ErrClockNotSet) {
				return id, err
			}
		}
		a.setStatus(func(s *Status) {
			s.Phase = PhaseWaitingClock
			// The date only: a message that changed every second would flood the log.
			s.Message = fmt.Sprintf("waiting for a valid clock: it says %s, the identity is valid from %s",
				now.UTC().Format(time.DateOnly), validFrom.UTC().Format(time.RFC3339))
		})
		req, err := a.pause(ctx, clockPoll)
		if err != nil {
			return nil, err
		}
		if req != nil {
			req.reply <- result{err: Mark(errors.New("the agent is waiting for a valid clock"), ErrTemporary)}
		}
	}
}

// loadState returns the stored assignment if it belongs to this identity. firstBoot reports
// that the device never registered (as opposed to a state that had to be discarded).
func (a *Agent) loadState(lock *storage.Locked, id *Identity, thumb string) (st *storage.State, firstBoot bool) {
	st, err := lock.Load()
	switch {
	case errors.Is(err, storage.ErrNotExist):
		return nil, true
	case err != nil:
		a.NoteError(fmt.Errorf("registering again: %w", err))
		return nil, false
	case !st.BelongsTo(id.RegistrationID, thumb):
		a.NoteError(fmt.Errorf("registering again: the stored assignment belongs to another identity (%s, certificate %s)", st.RegistrationID, st.CertSHA256))
		return nil, false
	}
	return st, false
}

// provision registers until DPS assigns a hub, then stores the assignment. With prev set
// (re-registration), prev stays stored until the new assignment replaces it.
func (a *Agent) provision(ctx context.Context, lock *storage.Locked, id *Identity, thumb string, prev *storage.State, firstBoot bool) (*storage.State, error) {
	var pending []*request
	answer := func(r result) {
		for _, req := range pending {
			req.reply <- r
		}
		pending = nil
	}
	defer func() { answer(result{err: Mark(errors.New("the agent is stopping"), ErrTemporary)}) }()

	if firstBoot && a.Config.Agent.FirstBootDelay > 0 {
		d := backoff.Jitter(a.Config.Agent.FirstBootDelay)
		a.setStatus(func(s *Status) {
			s.Phase, s.NextRetry = PhaseProvisioning, a.Clock.Now().Add(d)
			s.Message = fmt.Sprintf("first boot: waiting %s before registering with DPS, to spread the fleet's registrations", d.Round(time.Second))
		})
		if req, err := a.pause(ctx, d); err != nil {
			return nil, err
		} else if req != nil {
			pending = append(pending, req)
		}
	}

	start := a.Clock.Now()
	failures := 0
	for attempt := 1; ; attempt++ {
		a.setStatus(func(s *Status) {
			s.Phase, s.NextRetry = PhaseProvisioning, time.Time{}
			s.Message = fmt.Sprintf("registering %s with DPS (attempt %d)", id.RegistrationID, attempt)
		})
		for _, req := range pending {
			req.begin()
		}
		st, err := a.register(ctx, lock, id, thumb, prev, attempt, start)
		if err == nil {
			answer(result{state: st})
			return st, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		answer(result{err: err})
		failures++

		var req *request
		if errors.Is(err, ErrRefused) {
			req, err = a.park(ctx, err)
			failures = 0
		} else {
			d := max(a.Backoff(failures), retryAfter(err))
			req, err = a.retryLaterReq(ctx, PhaseProvisioning, "cannot register with DPS", err, failures, d)
		}
		if err != nil {
			return nil, err
		}
		if req != nil {
			pending = append(pending, req)
		}
	}
}

// registerOnce makes one registration and stores its result (see store).
func (a *Agent) registerOnce(ctx context.Context, lock *storage.Locked, id *Identity, thumb string, prev *storage.State) (*storage.State, error) {
	return a.register(ctx, lock, id, thumb, prev, 1, a.Clock.Now())
}

// register makes attempt number attempt of a registration that began at start, and stores
// its result (see store).
func (a *Agent) register(ctx context.Context, lock *storage.Locked, id *Identity, thumb string, prev *storage.State, attempt int, start time.Time) (*storage.State, error) {
	var st *storage.State
	err := a.bounded(ctx, func(ctx context.Context) error {
		var err error
		st, err = registerBound(ctx, a.Provisioner, id, thumb, prev, a.Clock.Now, attempt, start)
		return err
	})
	if err != nil {
		return nil, err
	}
	a.store(ctx, lock, st)
	a.inForce(st)
	return st, nil
}

// registerBound makes one registration and binds the assignment to the identity.
func registerBound(ctx context.Context, p Provisioner, id *Identity, thumb string, prev *storage.State, now func() time.Time, attempt int, start time.Time) (*storage.State, error) {
	st, err := p.Register(ctx, id, prev)
	if err != nil {
		return nil, err
	}
	st.RegistrationID, st.CertSHA256 = id.RegistrationID, thumb
	st.ProvisionedAt = now()
	st.Attempts, st.Duration = attempt, st.ProvisionedAt.Sub(start)
	return st, nil
}

// store saves a new assignment. One the disk refuses (full, read-only) is used all the same
// for this boot, and its write retried with backoff until it succeeds or a newer assignment
// replaces it: registering again cannot cure a disk, and each registration is billed and
// counted against the DPS quota. The status shows the refusal meanwhile (StoreError).
func (a *Agent) store(ctx context.Context, lock *storage.Locked, st *storage.State) {
	a.saveMu.Lock()
	a.saves++
	n := a.saves
	err := lock.Save(st)
	a.saveMu.Unlock()
	if err == nil {
		a.setStatus(func(s *Status) { s.StoreError = "" })
		return
	}
	err = fmt.Errorf("%w; the assignment is in use but not stored, and the write is retried", err)
	a.setStatus(func(s *Status) { s.StoreError, s.LastError, s.LastErrorAt = err.Error(), err.Error(), a.Clock.Now() })
	a.bg.Go(func() { a.retryStore(ctx, lock, st, n) })
}

// retryStore writes st, the saves'th assignment, with backoff until it is stored or a newer
// one was saved.
func (a *Agent) retryStore(ctx context.Context, lock *storage.Locked, st *storage.State, n int) {
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
		err := lock.Save(st)
		a.saveMu.Unlock()
		if err == nil {
			a.setStatus(func(s *Status) { s.StoreError = "" })
			return
		}
	}
}

// park waits out a permanent refusal on the slow retry, or until someone asks for a
// registration (the enrollment was fixed).
func (a *Agent) park(ctx context.Context, cause error) (*request, error) {
	next := a.Clock.Now().Add(a.Config.Agent.ParkedRetry)
	a.markReady()
	a.setStatus(func(s *Status) {
		s.Phase, s.NextRetry, s.Attempts = PhaseParked, next, 0
		s.Message = fmt.Sprintf("parked: DPS refused the device (%v); next try at %s, or run `unicity reprovision` once fixed", cause, next.UTC().Format(time.RFC3339))
		s.LastError, s.LastErrorAt = cause.Error(), a.Clock.Now()
	})
	return a.pause(ctx, a.Config.Agent.ParkedRetry)
}

// serve keeps the device connected to its hub. It returns the new assignment when the
// device had to register again.
func (a *Agent) serve(ctx context.Context, lock *storage.Locked, id *Identity, thumb string, st *storage.State) (*storage.State, error) {
	a.inForce(st)
	failures := 0
	for {
		a.setStatus(func(s *Status) {
			s.Phase, s.NextRetry, s.ConnectedSince = PhaseConnecting, time.Time{}, time.Time{}
			s.Message = fmt.Sprintf("connecting to %s as %s", st.AssignedHub, st.DeviceID)
		})
		var sess Session
		err := a.bounded(ctx, func(ctx context.Context) error {
			var err error
			sess, err = a.Hub.Connect(ctx, id, st)
			return err
		})
		if err == nil {
			next, serr := a.connected(ctx, lock, id, thumb, st, sess)
			if next != nil || serr != nil {
				return next, serr
			}
			err = sess.Err()
			failures = 0
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		failures++
		if errors.Is(err, ErrStale) {
			// The session already retried the hub that many times.
			failures = max(failures, a.Config.Agent.HubFailures)
		}
		if errors.Is(err, ErrIdentityRejected) {
			a.NoteError(err)
			return a.reprovision(ctx, lock, id, thumb, st, fmt.Sprintf("%s refused the identity", st.AssignedHub))
		}
		if failures >= a.Config.Agent.HubFailures && a.mayReprovision(st) {
			a.NoteError(err)
			a.setStatus(func(s *Status) {
				s.Phase, s.NextRetry = PhaseProvisioning, time.Time{}
				s.Message = fmt.Sprintf("%s could not be reached %d times in a row; asking DPS whether the assignment changed", st.AssignedHub, failures)
			})
			failures = 0
			next, rerr := a.registerOnce(ctx, lock, id, thumb, st)
			if rerr == nil {
				return next, nil
			}
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			err = fmt.Errorf("%w; registering again with DPS failed too: %w", err, rerr)
		}
		req, werr := a.retryLaterReq(ctx, PhaseConnecting, "cannot connect to "+st.AssignedHub, err, failures, a.Backoff(failures))
		if werr != nil {
			return nil, werr
		}
		if req != nil {
			if next := a.handle(ctx, lock, id, thumb, st, req); next != nil {
				return next, nil
			}
		}
	}
}

// connected waits on a live session. It returns a new assignment when a request made the
// device register again, or (nil, nil) when the connection was lost.
func (a *Agent) connected(ctx context.Context, lock *storage.Locked, id *Identity, thumb string, st *storage.State, sess Session) (*storage.State, error) {
	defer sess.Close()
	now := a.Clock.Now()
	a.markReady()
	a.setStatus(func(s *Status) {
		s.Phase, s.NextRetry, s.Attempts, s.ConnectedSince = PhaseConnected, time.Time{}, 0, now
		s.Message = fmt.Sprintf("connected to %s as %s", st.AssignedHub, st.DeviceID)
	})
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-sess.Done():
			return nil, nil
		case p := <-a.pings:
			close(p)
		case req := <-a.requests:
			if next := a.handle(ctx, lock, id, thumb, st, req); next != nil {
				return next, nil
			}
		}
	}
}

// handle answers a request made while the device has an assignment. It returns the new
// assignment if one was obtained; the old one stays in force otherwise.
func (a *Agent) handle(ctx context.Context, lock *storage.Locked, id *Identity, thumb string, st *storage.State, req *request) *storage.State {
	if req.ProvisionOnly {
		req.reply <- result{state: st}
		return nil
	}
	if !req.Force && !a.mayReprovision(st) {
		req.reply <- result{err: checkRateLimit(a.Config.Agent, st, a.Clock.Now())}
		return nil
	}
	a.setStatus(func(s *Status) {
		s.Message = fmt.Sprintf("registering %s with DPS again, as asked; %s stays in force until then", id.RegistrationID, st.AssignedHub)
	})
	req.begin()
	next, err := a.registerOnce(ctx, lock, id, thumb, st)
	req.reply <- result{state: next, err: err}
	if err != nil {
		a.NoteError(fmt.Errorf("registering again: %w", err))
		return nil
	}
	return next
}

// reprovision registers again because the hub refused the identity: the old assignment is
// useless, so it keeps trying, paced by the rate limit, then by the usual backoff, parking on
// refusals. A request by hand skips the rate limit.
func (a *Agent) reprovision(ctx context.Context, lock *storage.Locked, id *Identity, thumb string, st *storage.State, why string) (*storage.State, error) {
	for {
		wait := st.ProvisionedAt.Add(a.Config.Agent.ReprovisionInterval).Sub(a.Clock.Now())
		if wait <= 0 {
			return a.provision(ctx, lock, id, thumb, st, false)
		}
		next := a.Clock.Now().Add(wait)
		a.setStatus(func(s *Status) {
			s.Phase, s.NextRetry = PhaseProvisioning, next
			s.Message = fmt.Sprintf("%s; registering again with DPS at %s (at most one registration per %s)", why, next.UTC().Format(time.RFC3339), a.Config.Agent.ReprovisionInterval)
		})
		req, err := a.pause(ctx, wait)
		if err != nil {
			return nil, err
		}
		if req == nil {
			continue
		}
		if req.ProvisionOnly {
			req.reply <- result{err: Mark(fmt.Errorf("%s; the agent is about to register again", why), ErrTemporary)}
			continue
		}
		a.setStatus(func(s *Status) {
			s.NextRetry = time.Time{}
			s.Message = fmt.Sprintf("registering %s with DPS again, as asked", id.RegistrationID)
		})
		req.begin()
		fresh, err := a.registerOnce(ctx, lock, id, thumb, st)
		req.reply <- result{state: fresh, err: err}
		if err == nil {
			return fresh, nil
		}
		return a.provision(ctx, lock, id, thumb, st, false)
	}
}

func (a *Agent) mayReprovision(st *storage.State) bool {
	return checkRateLimit(a.Config.Agent, st, a.Clock.Now()) == nil
}

// checkRateLimit refuses a registration sooner than [agent] reprovision_interval after the
// one that produced st, with a *RateLimitError.
func checkRateLimit(pol config.Policy, st *storage.State, now time.Time) error {
	next := st.ProvisionedAt.Add(pol.ReprovisionInterval)
	if !now.Before(next) {
		return nil
	}
	return &RateLimitError{Last: st.ProvisionedAt, Next: next, Interval: pol.ReprovisionInterval}
}

// retryLater records err and waits d, serving requests with a refusal.
func (a *Agent) retryLater(ctx context.Context, phase Phase, what string, err error, attempt int, d time.Duration) error {
	req, werr := a.retryLaterReq(ctx, phase, what, err, attempt, d)
	if req != nil {
		req.reply <- result{err: Mark(fmt.Errorf("the agent is not ready: %s: %w", what, err), ErrTemporary)}
	}
	return werr
}

// retryLaterReq records err and waits d. It returns early with a request that arrived.
func (a *Agent) retryLaterReq(ctx context.Context, phase Phase, what string, err error, attempt int, d time.Duration) (*request, error) {
	next := a.Clock.Now().Add(d)
	a.setStatus(func(s *Status) {
		s.Phase, s.NextRetry, s.Attempts = phase, next, attempt
		s.Message = fmt.Sprintf("%s: %v; retrying in %s", what, err, d.Round(100*time.Millisecond))
		s.LastError, s.LastErrorAt = err.Error(), a.Clock.Now()
	})
	return a.pause(ctx, d)
}

func (a *Agent) NoteError(err error) {
	a.setStatus(func(s *Status) { s.LastError, s.LastErrorAt = err.Error(), a.Clock.Now() })
}

// pause waits d on the agent's clock. It returns early with a request that arrived, or with
// ctx's error when ctx ends. It answers the watchdog's pings meanwhile.
func (a *Agent) pause(ctx context.Context, d time.Duration) (*request, error) {
	timer := a.Clock.After(d)
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timer:
			return nil, nil
		case p := <-a.pings:
			close(p)
		case req := <-a.requests:
			return req, nil
		}
	}
}

// bounded runs one network attempt under AttemptTimeout, covering the watchdog meanwhile.
func (a *Agent) bounded(ctx context.Context, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, a.AttemptTimeout)
	defer cancel()
	defer a.covered(a.AttemptTimeout + 5*time.Second)()
	err := f(ctx)
	if err != nil && ctx.Err() == context.DeadlineExceeded && !errors.Is(err, ErrRefused) {
		err = Mark(fmt.Errorf("no answer within %s: %w", a.AttemptTimeout, err), ErrTemporary)
	}
	return err
}

// covered tells the watchdog that the loop is inside a call bounded by d, until done is
// called.
func (a *Agent) covered(d time.Duration) (done func()) {
	a.busyUntil.Store(time.Now().Add(d).UnixNano())
	return func() { a.busyUntil.Store(0) }
}

// Register asks the loop for a registration and waits for its answer: the assignment in
// force afterwards, or why there is none. An error marked ErrTemporary means the agent cannot
// register now (waiting for the lock, the TPM or the clock; stopping).
func (a *Agent) Register(ctx context.Context, r Request) (*storage.State, error) {
	req := &request{Request: r, reply: make(chan result, 1)}
	select {
	case a.requests <- req:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	select {
	case r := <-req.reply:
		return r.state, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Status returns the current status.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status
}

// inForce makes st the assignment in force, in the status too.
func (a *Agent) inForce(st *storage.State) {
	a.setStatus(func(s *Status) {
		s.AssignedHub, s.DeviceID = st.AssignedHub, st.DeviceID
		a.assignment = st // setStatus holds a.mu
	})
}

// Assignment is the assignment in force: the stored one the agent connects with, or the
// latest registration's. Nil before the first.
func (a *Agent) Assignment() *storage.State {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.assignment
}

// Subscribe returns a channel that receives every status change (the latest only, if the
// reader is slow) until cancel is called.
func (a *Agent) Subscribe() (<-chan Status, func()) {
	ch := make(chan Status, 1)
	a.mu.Lock()
	a.subs[ch] = struct{}{}
	a.mu.Unlock()
	return ch, func() {
		a.mu.Lock()
		delete(a.subs, ch)
		a.mu.Unlock()
	}
}

// setStatus applies change and publishes the result: subscribers, the status file, STATUS=
// and OnStatus. It may be called from any goroutine; publication keeps the order of changes.
func (a *Agent) setStatus(change func(*Status)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	before := a.status
	change(&a.status)
	s := &a.status
	now := a.Clock.Now()
	if s.Phase != before.Phase {
		s.Since = now
	}
	s.UpdatedAt = now
	snapshot := *s
	for ch := range a.subs {
		select {
		case <-ch:
		default:
		}
		ch <- snapshot
	}
	if snapshot.Phase == before.Phase && snapshot.Message == before.Message && snapshot.LastError == before.LastError && snapshot.StoreError == before.StoreError {
		return
	}
	if err := WriteStatus(a.Config.Runtime.Dir, snapshot); err != nil && !a.statusFailed {
		// Best effort: the loop must not stop over /run. Say it once, in the log.
		a.statusFailed = true
		snapshot.LastError = "cannot write the status file: " + err.Error()
	}
	if a.Notifier != nil && snapshot.Message != before.Message {
		a.Notifier.Notify("STATUS=" + snapshot.Message)
	}
	if a.OnStatus != nil {
		a.OnStatus(snapshot)
	}
}

// Progress shows in the status what a long call is doing (a registration polling, or waiting
// out a throttle), without changing the phase.
func (a *Agent) Progress(message string, wait time.Duration, err error) {
	a.setStatus(func(s *Status) {
		s.Message = message
		s.NextRetry = time.Time{}
		if wait > 0 {
			s.NextRetry = a.Clock.Now().Add(wait)
		}
		if err != nil {
			s.LastError, s.LastErrorAt = err.Error(), a.Clock.Now()
		}
	})
}

// markReady tells systemd, once, that the service is up: connected, or parked with a reason.
func (a *Agent) markReady() {
	if !a.ready.Swap(true) && a.Notifier != nil {
		a.Notifier.Notify("READY=1")
	}
}

// watchdog pings systemd at half the watchdog period while the loop is healthy: it answers a
// ping, or is inside a bounded call that has not overrun. A loop stuck anywhere else stops
// the pings, and systemd restarts the service. Until READY=1, a healthy loop also extends the
// start timeout.
func (a *Agent) watchdog(ctx context.Context) {
	t := time.NewTicker(a.Watchdog / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		p := make(chan struct{})
		answered := false
		select {
		case a.pings <- p:
			answered = true
		case <-time.After(a.Watchdog / 4):
		case <-ctx.Done():
			return
		}
		if answered || time.Now().UnixNano() < a.busyUntil.Load() {
			a.Notifier.Notify("WATCHDOG=1")
			if !a.ready.Load() {
				// Waiting for a clock or for DPS on a first boot can outlast TimeoutStartSec;
				// a healthy loop extends it rather than being restarted into the same wait.
				a.Notifier.Notify(fmt.Sprintf("EXTEND_TIMEOUT_USEC=%d", a.Watchdog.Microseconds()))
			}
		}
	}
}
