package telemetry_test

import (
	"context"
	"crypto/x509"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/internal/poll"
	"github.com/unicity-iot/unicity/telemetry"
)

// A paho call abandoned on a dead connection ends by itself within WriteTimeout, after Run
// has returned (see hub's own TestMain); any other goroutine left behind is a leak.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/unicity-iot/unicity/hub.(*Client).handoff.func1"))
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// deviceCA issues the gateway's certificates; the hubs trust it for the device.
type deviceCA struct{ *pki.CA }

func newDeviceCA(t testing.TB) deviceCA {
	ca, err := pki.NewRoot("device root")
	require.NoError(t, err)
	return deviceCA{ca}
}

// config registers device id with srv and returns a client configuration for it.
func (ca deviceCA) config(t testing.TB, srv *hubtest.Server, id string) hub.Config {
	require.NoError(t, srv.Register(hubtest.Device{ID: id, CAs: []*x509.Certificate{ca.Root()}}))
	leaf, err := ca.NewDevice(id)
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	return hub.Config{
		Hub:      srv.Name(),
		DeviceID: id,
		Dial:     dial.Config{Transport: dial.TransportMQTT, RootCAs: srv.RootCAs(), Certificate: &cert},
		// Quick reconnects, through the backoff path all the same.
		Backoff: func(int) time.Duration { return 5 * time.Millisecond },
		// Bounds the paho calls abandoned when a test cuts a connection under them.
		WriteTimeout: time.Second,
	}
}

// connect runs a hub client on q until stop or the end of the test.
func connect(t testing.TB, cfg hub.Config, q *hub.Queue) (stop func()) {
	t.Helper()
	cfg.Queue = q
	c, err := hub.New(cfg)
	require.NoError(t, err)
	return run(t, c.Run)
}

// run runs f on its own goroutine until stop or the end of the test, and checks that it
// returned because it was told to.
func run(t testing.TB, f func(context.Context) error) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				assert.ErrorIs(t, err, context.Canceled)
			case <-time.After(20 * time.Second):
				t.Error("did not return after cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// online forwards st to device "gw" of a new emulated hub, through a new hub queue.
func online(t testing.TB, st *telemetry.Store) *hubtest.Server {
	srv := hubtest.NewServer(t)
	q := hub.NewQueue(0, 0)
	connect(t, newDeviceCA(t).config(t, srv, "gw"), q)
	forward(t, st, q)
	return srv
}

// forward runs st.Forward(q) until stop or the end of the test.
func forward(t testing.TB, st *telemetry.Store, q telemetry.Queue) (stop func()) {
	return run(t, func(ctx context.Context) error { return st.Forward(ctx, q) })
}

func open(t testing.TB, o telemetry.Options) *telemetry.Store {
	t.Helper()
	st, err := telemetry.Open(o)
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	return st
}

// drained waits until the store holds nothing: the hub acknowledged everything.
func drained(t testing.TB, st *telemetry.Store) {
	t.Helper()
	err := poll.Until(testContext(t), 5*time.Millisecond, func() bool { return st.Stats().Messages == 0 })
	require.NoError(t, err, "still stored: %+v", st.Stats())
}

// mids are the "$.mid" of the messages as the hub received them.
func mids(got []hubtest.Telemetry) []string {
	var out []string
	for _, m := range got {
		out = append(out, m.System[hub.PropMessageID])
	}
	return out
}

// firsts is ids without the copies after the first of each.
func firsts(ids []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, id := range ids {
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out
}

// testClock is a clock the test moves; its timers fire when it passes them.
type testClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []testTimer
	asked  chan time.Duration // every After, for the test to see who waits
}

type testTimer struct {
	at time.Time
	c  chan time.Time
}

func newTestClock() *testClock {
	return &testClock{now: time.Now(), asked: make(chan time.Duration, 256)}
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) After(d time.Duration) <-chan time.Time {
	ch := make(chan time.Time, 1)
	c.mu.Lock()
	c.timers = append(c.timers, testTimer{c.now.Add(d), ch})
	c.mu.Unlock()
	select {
	case c.asked <- d:
	default:
	}
	return ch
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, tm := range c.timers {
		if tm.at.After(c.now) {
			kept = append(kept, tm)
			continue
		}
		tm.c <- c.now
	}
	c.timers = kept
}

// awaitAfter waits until something asks the clock to wait d.
func (c *testClock) awaitAfter(t testing.TB, d time.Duration) {
	t.Helper()
	ctx := testContext(t)
	for {
		select {
		case got := <-c.asked:
			if got == d {
				return
			}
		case <-ctx.Done():
			t.Fatalf("nothing waited %s", d)
		}
	}
}

// errorIs checks err against every target.
func errorIs(t testing.TB, err error, targets ...error) {
	t.Helper()
	for _, target := range targets {
		assert.True(t, errors.Is(err, target), "%v is not %v", err, target)
	}
}
