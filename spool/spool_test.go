package spool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testClock is a clock the test sets.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *testClock { return &testClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// After never fires: the tests that move this clock do not wait on it.
func (c *testClock) After(time.Duration) <-chan time.Time { return nil }

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func open(t testing.TB, dir string, o Options) *Spool {
	t.Helper()
	s, err := Open(dir, o)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// msg is message n of app: its mid says which, and so does its payload.
func msg(app string, n int) Message {
	return Message{
		App:        app,
		Properties: map[string]string{"$.mid": app + "-" + strconv.Itoa(n), "$.ct": "application/json", "seq": strconv.Itoa(n)},
		Payload:    []byte(fmt.Sprintf(`{"app":%q,"n":%d}`, app, n)),
	}
}

func appendN(t testing.TB, s *Spool, app string, from, to int) []ID {
	t.Helper()
	var ids []ID
	for n := from; n < to; n++ {
		id, err := s.Append(context.Background(), msg(app, n))
		require.NoError(t, err)
		ids = append(ids, id)
	}
	return ids
}

// next takes a record that must be there already.
func next(t testing.TB, s *Spool) Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := s.Next(ctx)
	require.NoError(t, err)
	return r
}

// mids takes n records and returns their mids.
func mids(t testing.TB, s *Spool, n int) []string {
	t.Helper()
	var got []string
	for range n {
		got = append(got, next(t, s).Properties["$.mid"])
	}
	return got
}

// empty says Next has nothing to hand out.
func empty(t testing.TB, s *Spool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	r, err := s.Next(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded, "Next handed out %d (%s)", r.ID, r.Properties["$.mid"])
}

func names(app string, from, to int) []string {
	var n []string
	for i := from; i < to; i++ {
		n = append(n, app+"-"+strconv.Itoa(i))
	}
	return n
}

func TestAppendNextKeepsMessagesWhole(t *testing.T) {
	c := newClock()
	s := open(t, t.TempDir(), Options{Clock: c})
	in := Message{
		App:        "sensor",
		Properties: map[string]string{"$.mid": "m-1", "$.ct": "application/json", "": "empty name", "flag": "", "ünï": "cödé&=/"},
		Payload:    []byte{0, 1, 2, 0xff},
	}
	id, err := s.Append(context.Background(), in)
	require.NoError(t, err)
	_, err = s.Append(context.Background(), Message{})
	require.NoError(t, err, "an empty message is a message")

	r := next(t, s)
	assert.Equal(t, id, r.ID)
	assert.Equal(t, in, r.Message)
	assert.True(t, r.Time.Equal(c.Now()), "stamped with the injected clock: %s", r.Time)
	r = next(t, s)
	assert.Equal(t, Message{}, r.Message)
	empty(t, s)

	st := s.Stats()
	info, err := os.Stat(segmentFiles(t, s.dir)[0])
	require.NoError(t, err)
	assert.Equal(t, info.Size(), st.Bytes)
	assert.Equal(t, info.Size(), st.Written, "nothing acknowledged yet: only the segment was written")
	assert.Equal(t, 2, st.Messages)
	assert.Equal(t, 2, st.InFlight)
}

func TestOrderAcrossSegmentsAndApps(t *testing.T) {
	s := open(t, t.TempDir(), Options{MaxBytes: 1 << 20, SegmentBytes: 4 << 10})
	var want []string
	for i := range 300 {
		app := []string{"a", "b", "c"}[i%3]
		appendN(t, s, app, i, i+1)
		want = append(want, app+"-"+strconv.Itoa(i))
	}
	assert.Greater(t, len(segmentFiles(t, s.dir)), 5, "the messages span segments")
	assert.Equal(t, want, mids(t, s, 300))
}

func segmentFiles(t testing.TB, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.seg"))
	require.NoError(t, err)
	return files
}

// TestUnackedComeBackAfterRestart acknowledges some messages, out of order, and checks that
// the others, and only they, come back after a Close and after a crash (no Close).
func TestUnackedComeBackAfterRestart(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	require.NoError(t, err)
	appendN(t, s, "a", 0, 10)
	var r [10]Record
	for i := range r {
		r[i] = next(t, s)
	}
	for _, i := range []int{1, 0, 2, 5, 7} {
		require.NoError(t, s.Ack(r[i].ID))
	}
	require.NoError(t, s.Close())

	s = open(t, dir, Options{})
	// 0..2 are below the acknowledgement mark; 5 and 7 were acknowledged above it, which
	// only memory knew: they come back, at least once is the promise.
	assert.Equal(t, names("a", 3, 10), mids(t, s, 7))
	empty(t, s)
	assert.Equal(t, 7, s.Stats().Messages)
}

func TestAckedSegmentsAreRemoved(t *testing.T) {
	s := open(t, t.TempDir(), Options{MaxBytes: 1 << 20, SegmentBytes: 4 << 10})
	appendN(t, s, "a", 0, 200)
	before := len(segmentFiles(t, s.dir))
	require.Greater(t, before, 3)
	for range 200 {
		require.NoError(t, s.Ack(next(t, s).ID))
	}
	st := s.Stats()
	assert.Equal(t, 0, st.Messages)
	assert.Equal(t, time.Duration(0), st.OldestAge)
	// The writer removes them in the background; Close waits for it.
	require.NoError(t, s.Close())
	assert.Len(t, segmentFiles(t, s.dir), 1, "only the segment being appended to stays")

	s = open(t, s.dir, Options{MaxBytes: 1 << 20, SegmentBytes: 4 << 10})
	empty(t, s)
	ids := appendN(t, s, "a", 200, 201)
	assert.Greater(t, ids[0], ID(200), "IDs go on rising after a restart")
	assert.Equal(t, names("a", 200, 201), mids(t, s, 1))
}

// TestRequeue is the sender's reconnect: what was in flight without an acknowledgement goes
// out again, first and in order, skipping what was acknowledged out of order.
func TestRequeue(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	appendN(t, s, "a", 0, 6)
	var r []Record
	for range 4 {
		r = append(r, next(t, s))
	}
	require.NoError(t, s.Ack(r[1].ID))
	require.NoError(t, s.Ack(r[2].ID))
	assert.Equal(t, 2, s.Stats().InFlight, "two of four in flight acknowledged")
	s.Requeue()
	assert.Equal(t, 0, s.Stats().InFlight)
	assert.Equal(t, []string{"a-0", "a-3", "a-4", "a-5"}, mids(t, s, 4))
	empty(t, s)
	assert.Equal(t, 4, s.Stats().InFlight)
	s.Requeue()
	require.NoError(t, s.Ack(r[0].ID))
	assert.Equal(t, []string{"a-3", "a-4", "a-5"}, mids(t, s, 3))
}

func TestAckErrors(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	ids := appendN(t, s, "a", 0, 2)
	assert.ErrorIs(t, s.Ack(ids[0]), ErrUnknownID, "not handed out yet")
	r := next(t, s)
	require.NoError(t, s.Ack(r.ID))
	require.NoError(t, s.Ack(r.ID), "acknowledging twice is harmless (a PUBACK after a resend)")
	assert.ErrorIs(t, s.Ack(12345), ErrUnknownID)
	require.NoError(t, s.Close())
	assert.ErrorIs(t, s.Ack(ids[1]), ErrClosed)
	_, err := s.Append(context.Background(), msg("a", 3))
	assert.ErrorIs(t, err, ErrClosed)
	_, err = s.Next(context.Background())
	assert.ErrorIs(t, err, ErrClosed)
	assert.NoError(t, s.Close(), "Close twice")
}

func TestNextWaitsForAppendAndClose(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	got := make(chan Record)
	go func() {
		r, err := s.Next(context.Background())
		assert.NoError(t, err)
		got <- r
	}()
	appendN(t, s, "a", 0, 1)
	assert.Equal(t, "a-0", (<-got).Properties["$.mid"])

	errc := make(chan error)
	go func() {
		_, err := s.Next(context.Background())
		errc <- err
	}()
	require.NoError(t, s.Close())
	assert.ErrorIs(t, <-errc, ErrClosed)
}

func TestAwaitAck(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	ids := appendN(t, s, "a", 0, 3)
	done := make(chan error, 1)
	go func() { done <- s.AwaitAck(context.Background(), ids[0]) }()
	r := next(t, s)
	select {
	case err := <-done:
		t.Fatalf("AwaitAck returned before the Ack: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	require.NoError(t, s.Ack(r.ID))
	require.NoError(t, <-done)
	require.NoError(t, s.AwaitAck(context.Background(), ids[0]), "after the Ack")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, s.AwaitAck(ctx, ids[1]), context.DeadlineExceeded)
	s.mu.Lock()
	assert.Empty(t, s.waiters, "a waiter that gave up leaves nothing behind")
	s.mu.Unlock()
	assert.ErrorIs(t, s.AwaitAck(context.Background(), 999), ErrUnknownID)

	go func() { done <- s.AwaitAck(context.Background(), ids[2]) }()
	require.Eventually(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.waiters[ids[2]] != nil
	}, 5*time.Second, time.Millisecond)
	require.NoError(t, s.Close())
	assert.ErrorIs(t, <-done, ErrClosed)
}

func TestOpenMakesPrivateFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	require.NoError(t, os.Mkdir(dir, 0o755))
	s := open(t, dir, Options{})
	appendN(t, s, "a", 0, 1)
	require.NoError(t, s.Ack(next(t, s).ID))
	require.NoError(t, s.Close())
	info, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), info.Mode().Perm(), "a spool directory found open is closed to others")
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 3, "segment, acked, lock")
	for _, e := range entries {
		info, err := e.Info()
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), info.Mode().Perm(), e.Name())
	}

	seg := segmentFiles(t, dir)[0]
	require.NoError(t, os.Chmod(seg, 0o644))
	open(t, dir, Options{}).Close()
	info, err = os.Stat(seg)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), info.Mode().Perm(), "Open makes its files private again")
}

func TestOneProcessAtATime(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, Options{})
	_, err := Open(dir, Options{})
	assert.ErrorIs(t, err, ErrLocked)
	require.NoError(t, s.Close())
	open(t, dir, Options{})
}

func TestOpenRefusesBadOptionsAndPlaces(t *testing.T) {
	dir := t.TempDir()
	for _, o := range []Options{
		{MaxBytes: 1000},
		{MaxAge: -time.Second},
		{MaxBytes: 1 << 20, SegmentBytes: 1 << 19},
		{SegmentBytes: 100},
		{WhenFull: Policy(7)},
	} {
		_, err := Open(dir, o)
		assert.Error(t, err, "%+v", o)
	}
	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	_, err := Open(file, Options{})
	assert.ErrorContains(t, err, "not a directory")
}

func TestTooLarge(t *testing.T) {
	s := open(t, t.TempDir(), Options{MaxBytes: 256 << 10})
	_, err := s.Append(context.Background(), Message{Payload: make([]byte, MaxMessageBytes)})
	assert.ErrorIs(t, err, ErrTooLarge)
	_, err = s.Append(context.Background(), Message{Payload: make([]byte, 65<<10)})
	assert.ErrorIs(t, err, ErrTooLarge, "more than a quarter of the spool could never fit beside a segment")
	_, err = s.Append(context.Background(), Message{Payload: make([]byte, 60<<10)})
	assert.NoError(t, err)
	assert.Equal(t, 1, s.Stats().Messages)
}

func TestPolicyText(t *testing.T) {
	for _, p := range []Policy{RefuseNew, DropOldest} {
		b, err := p.MarshalText()
		require.NoError(t, err)
		var q Policy
		require.NoError(t, q.UnmarshalText(b))
		assert.Equal(t, p, q)
	}
	var q Policy
	assert.ErrorContains(t, q.UnmarshalText([]byte("drop-newest")), "refuse-new or drop-oldest")
	_, err := Policy(9).MarshalText()
	assert.Error(t, err)
}

func TestAppendContextEnds(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := s.Append(ctx, msg("a", 0))
	if err != nil {
		assert.True(t, errors.Is(err, context.Canceled), "%v", err)
	}
	// Stored or not, the spool goes on working.
	appendN(t, s, "a", 1, 2)
	got := mids(t, s, s.Stats().Messages)
	assert.Contains(t, got, "a-1")
}
