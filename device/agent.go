package device

import (
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
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
	// OnboardingPoll is how often to look at the onboarding certificate file for a new one
	// (OnboardingPoll for the service); zero: only on Reload.
	OnboardingPoll time.Duration
	// AttemptTimeout bounds one registration or one connection attempt.
	AttemptTimeout time.Duration
	// OnStatus is called after every change of the status, for the service's log. It runs
	// under the status lock: it must not call back into the Agent.
	OnStatus func(Status)
	// OnCredential, when set, is called on the loop's goroutine when the hub's credential
	// changes (an operational certificate issued, or given up for the onboarding identity),
	// for the service's log.
	OnCredential func(CredentialEvent)
	// Services run beside the lifecycle for as long as Run runs (the local API, the gateway
	// relay); Run returns once they have. They reach the agent through its exported methods
	// (Status, Subscribe, Register, Assignment, NoteError).
	Services []func(context.Context)

	mu     sync.Mutex
	status Status
	// current is the run of the lifecycle, once Run began it; see Assignment.
	current *run
	subs    map[chan Status]struct{}
	ready   atomic.Bool // READY=1 sent
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
	// reload asks the loop to load the onboarding credential again (Agent.Reload).
	reload    bool
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
	a.bg.Go(func() { a.watchOnboarding(ctx) })
	for _, service := range a.Services {
		a.bg.Go(func() { service(ctx) })
	}
	a.setStatus(func(s *Status) { s.Phase, s.Message = PhaseStarting, "starting" })

	err := a.lifecycle(ctx)
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

// NoteError shows err in the status as the last error, without changing the phase.
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
	return a.ask(ctx, &request{Request: r, reply: make(chan result, 1)})
}

// ask hands req to the loop and waits for its answer.
func (a *Agent) ask(ctx context.Context, req *request) (*storage.State, error) {
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

// Assignment is the assignment in force: the stored one the agent connects with, or the
// latest registration's. Nil before the first.
func (a *Agent) Assignment() *storage.State {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.current == nil {
		return nil
	}
	return a.current.assignment
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
	said := snapshot.Phase != before.Phase || snapshot.Message != before.Message || snapshot.LastError != before.LastError || snapshot.StoreError != before.StoreError
	// The credentials' lifecycle changes without a line of its own (a renewal scheduled
	// again): the file follows it all the same, for `status` run without the local API.
	lifecycle := snapshot.Credential != before.Credential || !reflect.DeepEqual(snapshot.Renewal, before.Renewal) || !reflect.DeepEqual(snapshot.Onboarding, before.Onboarding)
	if !said && !lifecycle {
		return
	}
	if err := WriteStatus(a.Config.Runtime.Dir, snapshot); err != nil && !a.statusFailed {
		// Best effort: the loop must not stop over /run. Say it once, in the log.
		a.statusFailed = true
		snapshot.LastError = "cannot write the status file: " + err.Error()
		said = true
	}
	if !said {
		return
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
