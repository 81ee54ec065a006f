package telemetry_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/poll"
	"github.com/unicity-iot/unicity/spool"
	"github.com/unicity-iot/unicity/telemetry"
)

const uuidV4 = `^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`

// reading is message n of a sensor, without a "$.mid": Submit gives it one.
func reading(n int) hub.Message {
	return hub.Message{
		Payload:    []byte(fmt.Sprintf(`{"n":%d}`, n)),
		Properties: map[string]string{hub.PropContentType: "application/json", "seq": strconv.Itoa(n)},
	}
}

type submitted struct {
	r   telemetry.Receipt
	err error
}

// submitting submits m on its own goroutine and sends what Submit returned.
func submitting(ctx context.Context, st *telemetry.Store, m hub.Message, wait time.Duration) <-chan submitted {
	done := make(chan submitted, 1)
	go func() {
		r, err := st.Submit(ctx, "sensor", m, wait)
		done <- submitted{r, err}
	}()
	return done
}

// submitAll submits messages from..to-1 with wait 0 on its own goroutine and sends their
// MIDs, in order, once all are stored.
func submitAll(ctx context.Context, st *telemetry.Store, from, to int) <-chan []string {
	done := make(chan []string, 1)
	go func() {
		var ids []string
		defer func() { done <- ids }()
		for i := from; i < to; i++ {
			r, err := st.Submit(ctx, "sensor", reading(i), 0)
			if err != nil {
				return
			}
			ids = append(ids, r.MID)
		}
	}()
	return done
}

func TestDeliversInOrderWithMIDs(t *testing.T) {
	st := open(t, telemetry.Options{Dir: t.TempDir()})
	srv := online(t, st)
	ctx := testContext(t)

	var want []string
	for i := range 40 {
		m := reading(i)
		if i%2 == 0 {
			m.Properties[hub.PropMessageID] = "app-" + strconv.Itoa(i)
		}
		r, err := st.Submit(ctx, "sensor", m, 0)
		require.NoError(t, err)
		assert.False(t, r.Delivered, "wait 0 answers once stored")
		if i%2 == 0 {
			assert.Equal(t, "app-"+strconv.Itoa(i), r.MID, "the application's own mid is kept")
		} else {
			assert.Regexp(t, uuidV4, r.MID)
			assert.NotContains(t, m.Properties, hub.PropMessageID, "the caller's map is left alone")
		}
		want = append(want, r.MID)
	}
	r, err := st.Submit(ctx, "sensor", hub.Message{Payload: []byte("last")}, 10*time.Second)
	require.NoError(t, err)
	assert.True(t, r.Delivered, "a wait answers after the PUBACK")
	want = append(want, r.MID)

	got := srv.Telemetry("gw")
	assert.Equal(t, want, mids(got), "in order, each with its mid, once: no connection dropped")
	assert.Equal(t, `{"n":3}`, string(got[3].Payload))
	assert.Equal(t, map[string]string{"seq": "3"}, got[3].Properties)
	assert.Equal(t, "application/json", got[3].System[hub.PropContentType])
	drained(t, st)
	stats := st.Stats()
	assert.Zero(t, stats.InFlight)
	assert.Positive(t, stats.Written)
}

// TestSurvivesDisconnects has the hub drop the connection again and again while messages
// stream through: every one arrives, first copies in order.
func TestSurvivesDisconnects(t *testing.T) {
	st := open(t, telemetry.Options{Dir: t.TempDir()})
	srv := online(t, st)
	ctx := testContext(t)

	const n, drops = 300, 5
	submitted := submitAll(ctx, st, 0, n)
	cuts := 0
	for d := range drops {
		require.NoError(t, srv.Await(ctx, func() bool { return len(srv.Telemetry("gw")) >= (d+1)*n/(drops+2) }))
		if err := srv.Disconnect("gw"); err == nil {
			cuts++
		} else {
			require.ErrorIs(t, err, hubtest.ErrDeviceNotOnline, "reconnecting from the last cut")
		}
	}
	want := <-submitted
	require.Len(t, want, n)
	drained(t, st)
	got := mids(srv.Telemetry("gw"))
	assert.Equal(t, want, firsts(got), "nothing lost, first copies in order")
	assert.Positive(t, cuts)
	t.Logf("%d cuts, %d duplicates", cuts, len(got)-n)
}

// TestSurvivesAChangeOfHub moves the device to another hub mid-stream, the one queue
// handed from the first hub's client to the second's as the agent does.
func TestSurvivesAChangeOfHub(t *testing.T) {
	ca := newDeviceCA(t)
	first, second := hubtest.NewServer(t), hubtest.NewServer(t)
	cfg1, cfg2 := ca.config(t, first, "gw"), ca.config(t, second, "gw")
	q := hub.NewQueue(0, 0)
	stop1 := connect(t, cfg1, q)
	st := open(t, telemetry.Options{Dir: t.TempDir()})
	forward(t, st, q)
	ctx := testContext(t)

	const n = 200
	submitted := submitAll(ctx, st, 0, n)
	require.NoError(t, first.Await(ctx, func() bool { return len(first.Telemetry("gw")) >= n/4 }))
	stop1()
	connect(t, cfg2, q)
	want := <-submitted
	require.Len(t, want, n)
	drained(t, st)
	got := append(mids(first.Telemetry("gw")), mids(second.Telemetry("gw"))...)
	assert.Equal(t, want, firsts(got), "nothing lost, first copies in order")
	assert.NotEmpty(t, second.Telemetry("gw"), "the rest went to the new hub")
}

// TestRestartSendsWhatWasNotAcknowledged ends the process's store and forwarder with
// messages in the hub queue and in the spool, and starts new ones on the same directory.
func TestRestartSendsWhatWasNotAcknowledged(t *testing.T) {
	srv := hubtest.NewServer(t)
	cfg := newDeviceCA(t).config(t, srv, "gw")
	dir := t.TempDir()
	ctx := testContext(t)

	st, err := telemetry.Open(telemetry.Options{Dir: dir})
	require.NoError(t, err)
	q := hub.NewQueue(0, 0)
	stopClient := connect(t, cfg, q)
	stopForward := forward(t, st, q)
	var want []string
	for i := range 10 {
		r, err := st.Submit(ctx, "sensor", reading(i), 10*time.Second)
		require.NoError(t, err)
		require.True(t, r.Delivered)
		want = append(want, r.MID)
	}
	stopClient() // the link goes down
	want = append(want, <-submitAll(ctx, st, 10, 30)...)
	require.NoError(t, poll.Until(ctx, 5*time.Millisecond, func() bool { n, _ := q.Len(); return n == 20 }))
	assert.Equal(t, 20, st.Stats().InFlight, "in the hub queue, waiting for a PUBACK")
	stopForward()
	require.NoError(t, st.Close())

	st = open(t, telemetry.Options{Dir: dir})
	assert.Equal(t, 20, st.Stats().Messages, "what the hub had not acknowledged is still there")
	q = hub.NewQueue(0, 0)
	connect(t, cfg, q)
	forward(t, st, q)
	drained(t, st)
	assert.Equal(t, want, mids(srv.Telemetry("gw")), "all of them, once, in order")
}

// TestWaitsForRoomInTheHubQueue fills the hub queue with the forwarder's own messages while
// the link is down: it waits, and sends the rest as the hub acknowledges.
func TestWaitsForRoomInTheHubQueue(t *testing.T) {
	srv := hubtest.NewServer(t)
	q := hub.NewQueue(4, 0)
	st := open(t, telemetry.Options{Dir: t.TempDir()})
	forward(t, st, q)
	ctx := testContext(t)

	want := <-submitAll(ctx, st, 0, 50)
	require.Len(t, want, 50)
	require.NoError(t, poll.Until(ctx, 5*time.Millisecond, func() bool { return st.Stats().InFlight == 5 }))
	n, _ := q.Len()
	assert.Equal(t, 4, n, "as many as the hub queue takes")
	assert.Equal(t, 5, st.Stats().InFlight, "and one waiting for room")

	connect(t, newDeviceCA(t).config(t, srv, "gw"), q)
	drained(t, st)
	assert.Equal(t, want, mids(srv.Telemetry("gw")), "none lost, once each, in order")
	assert.Zero(t, st.Stats().Rejected)
}

// TestWaitsOnTheClockForAQueueFullOfOthers fills the hub queue with messages the forwarder
// did not send, whose acknowledgements it does not hear of: it tries again on its clock.
func TestWaitsOnTheClockForAQueueFullOfOthers(t *testing.T) {
	srv := hubtest.NewServer(t)
	q := hub.NewQueue(2, 0)
	var want []string
	for _, mid := range []string{"other-1", "other-2"} {
		_, err := q.Enqueue(hub.Message{Payload: []byte(mid), Properties: map[string]string{hub.PropMessageID: mid}})
		require.NoError(t, err)
		want = append(want, mid)
	}
	clk := newTestClock()
	st := open(t, telemetry.Options{Dir: t.TempDir(), Clock: clk})
	forward(t, st, q)
	ctx := testContext(t)
	want = append(want, <-submitAll(ctx, st, 0, 3)...)
	clk.awaitAfter(t, telemetry.QueueFullRetry)

	connect(t, newDeviceCA(t).config(t, srv, "gw"), q)
	// The others' PUBACKs empty the hub queue, and the forwarder does not hear of it.
	require.NoError(t, poll.Until(ctx, time.Millisecond, func() bool { n, _ := q.Len(); return n == 0 }))
	assert.Len(t, srv.Telemetry("gw"), 2)
	assert.Equal(t, 3, st.Stats().Messages, "the forwarder sleeps until its clock says")
	clk.Advance(telemetry.QueueFullRetry)
	drained(t, st)
	assert.Equal(t, want, mids(srv.Telemetry("gw")))
}

func TestRefuseNewWhenFull(t *testing.T) {
	st := open(t, telemetry.Options{Dir: t.TempDir(), MaxBytes: spool.MinMaxBytes})
	ctx := testContext(t)
	m := hub.Message{Payload: []byte(strings.Repeat("x", 1024))}
	stored := 0
	for ; stored < 100; stored++ {
		_, err := st.Submit(ctx, "sensor", m, 0)
		if err != nil {
			errorIs(t, err, telemetry.ErrFull, spool.ErrFull)
			break
		}
	}
	require.Less(t, stored, 100, "64 KiB holds fewer than 100 messages of 1 KiB")
	stats := st.Stats()
	assert.Equal(t, stored, stats.Messages, "nothing stored was given up")
	assert.Zero(t, stats.Dropped)

	// The link comes up: the hub takes them all, and there is room again.
	srv := online(t, st)
	drained(t, st)
	r, err := st.Submit(ctx, "sensor", m, 10*time.Second)
	require.NoError(t, err)
	assert.True(t, r.Delivered)
	assert.Len(t, srv.Telemetry("gw"), stored+1)
}

func TestDropOldestCounts(t *testing.T) {
	st := open(t, telemetry.Options{Dir: t.TempDir(), MaxBytes: spool.MinMaxBytes, WhenFull: spool.DropOldest})
	ctx := testContext(t)
	oldest := submitting(ctx, st, reading(0), time.Minute)
	require.NoError(t, poll.Until(ctx, time.Millisecond, func() bool { return st.Stats().Messages == 1 }))

	var last string
	n := 1
	for ; st.Stats().Dropped == 0; n++ {
		require.Less(t, n, 1000, "nothing dropped")
		r, err := st.Submit(ctx, "sensor", hub.Message{Payload: []byte(strings.Repeat("x", 1024))}, 0)
		require.NoError(t, err, "drop-oldest makes room")
		last = r.MID
	}
	res := <-oldest
	errorIs(t, res.err, telemetry.ErrDropped, spool.ErrDropped)
	assert.NotEmpty(t, res.r.MID)
	stats := st.Stats()
	assert.Equal(t, n-int(stats.Dropped), stats.Messages)

	srv := online(t, st)
	drained(t, st)
	got := mids(srv.Telemetry("gw"))
	assert.Len(t, got, stats.Messages, "what was not dropped arrives")
	assert.NotContains(t, got, res.r.MID)
	assert.Equal(t, last, got[len(got)-1])
}

func TestSubmitRefuses(t *testing.T) {
	st := open(t, telemetry.Options{Dir: t.TempDir(), MaxBytes: spool.MinMaxBytes})
	ctx := testContext(t)

	r, err := st.Submit(ctx, "a", hub.Message{Payload: make([]byte, hub.MaxTelemetrySize)}, 0)
	errorIs(t, err, telemetry.ErrTooLarge, hub.ErrTooLarge)
	assert.Empty(t, r.MID, "refused: no MID")
	_, err = st.Submit(ctx, "a", hub.Message{Payload: make([]byte, spool.MinMaxBytes/4)}, 0)
	errorIs(t, err, telemetry.ErrTooLarge, spool.ErrTooLarge)
	_, err = st.Submit(ctx, "a", hub.Message{Properties: map[string]string{"": "x"}}, 0)
	errorIs(t, err, telemetry.ErrInvalid)
	assert.Zero(t, st.Stats().Messages, "none of them stored")

	require.NoError(t, st.Close())
	r, err = st.Submit(ctx, "a", reading(1), 0)
	errorIs(t, err, telemetry.ErrClosed, spool.ErrClosed)
	assert.Empty(t, r.MID)
}

// TestOptionsAreTheTelemetryTable decodes the [telemetry] table the configuration proposes.
func TestOptionsAreTheTelemetryTable(t *testing.T) {
	var cfg struct {
		Telemetry telemetry.Options `toml:"telemetry"`
	}
	_, err := toml.Decode(`
[telemetry]
dir = "/var/lib/unicity/telemetry"
max_bytes = 8388608
max_age = "72h"
when_full = "drop-oldest"
`, &cfg)
	require.NoError(t, err)
	assert.Equal(t, telemetry.Options{Dir: "/var/lib/unicity/telemetry", MaxBytes: 8 << 20, MaxAge: 72 * time.Hour, WhenFull: spool.DropOldest}, cfg.Telemetry)
	_, err = toml.Decode("[telemetry]\nwhen_full = \"drop-newest\"", &cfg)
	assert.ErrorContains(t, err, "refuse-new or drop-oldest")
}

// TestWaitRunsOut: no PUBACK within the wait answers ErrNotConfirmed; the message stays and
// goes once the link is up.
func TestWaitRunsOut(t *testing.T) {
	clk := newTestClock()
	st := open(t, telemetry.Options{Dir: t.TempDir(), Clock: clk})
	ctx := testContext(t)
	first := submitting(ctx, st, reading(1), 7*time.Second)
	clk.awaitAfter(t, 7*time.Second)
	clk.Advance(7 * time.Second)
	res := <-first
	errorIs(t, res.err, telemetry.ErrNotConfirmed)
	assert.False(t, res.r.Delivered)

	cancelled, cancel := context.WithCancel(ctx)
	hungUp := submitting(cancelled, st, reading(2), 7*time.Second)
	clk.awaitAfter(t, 7*time.Second)
	cancel() // the application hung up
	second := <-hungUp
	errorIs(t, second.err, telemetry.ErrNotConfirmed, context.Canceled)
	assert.Equal(t, 2, st.Stats().Messages, "both stay queued")

	srv := online(t, st)
	drained(t, st)
	assert.Equal(t, []string{res.r.MID, second.r.MID}, mids(srv.Telemetry("gw")))
}

// TestRejectsWhatTheHubNeverTakes: a message stored by a version with other limits is
// removed and counted, and the ones behind it go.
func TestRejectsWhatTheHubNeverTakes(t *testing.T) {
	dir := t.TempDir()
	sp, err := spool.Open(dir, spool.Options{MaxBytes: 4 << 20})
	require.NoError(t, err)
	ctx := testContext(t)
	for _, m := range []spool.Message{
		{App: "old", Properties: map[string]string{hub.PropMessageID: "huge"}, Payload: make([]byte, hub.MaxTelemetrySize+1)},
		{App: "old", Properties: map[string]string{hub.PropMessageID: "fine"}, Payload: []byte("fine")},
	} {
		_, err := sp.Append(ctx, m)
		require.NoError(t, err)
	}
	require.NoError(t, sp.Close())

	st := open(t, telemetry.Options{Dir: dir, MaxBytes: 4 << 20})
	srv := online(t, st)
	drained(t, st)
	assert.Equal(t, []string{"fine"}, mids(srv.Telemetry("gw")))
	assert.Equal(t, int64(1), st.Stats().Rejected)
}

func TestForwardEnds(t *testing.T) {
	st, err := telemetry.Open(telemetry.Options{Dir: t.TempDir()})
	require.NoError(t, err)
	q := hub.NewQueue(0, 0)
	ended := make(chan error, 1)
	go func() { ended <- st.Forward(context.Background(), q) }()
	_, err = st.Submit(testContext(t), "sensor", reading(1), 0)
	require.NoError(t, err)
	require.NoError(t, poll.Until(testContext(t), time.Millisecond, func() bool { return st.Stats().InFlight == 1 }))

	assert.Error(t, st.Forward(context.Background(), q), "one Forward at a time")
	require.NoError(t, st.Close())
	select {
	case err := <-ended:
		errorIs(t, err, telemetry.ErrClosed)
	case <-time.After(10 * time.Second):
		t.Fatal("Forward did not end when the store closed")
	}
}

func TestOpenNeedsADirectory(t *testing.T) {
	_, err := telemetry.Open(telemetry.Options{})
	assert.Error(t, err)
	dir := t.TempDir()
	open(t, telemetry.Options{Dir: dir})
	_, err = telemetry.Open(telemetry.Options{Dir: dir})
	assert.True(t, errors.Is(err, spool.ErrLocked), "one process at a time: %v", err)
}
