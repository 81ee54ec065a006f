package spool

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// small is a 64 KiB spool of 4 KiB segments, and a message of about 500 bytes for it.
var small = Options{MaxBytes: 64 << 10, SegmentBytes: 4 << 10}

func bigMsg(n int) Message {
	m := msg("a", n)
	m.Payload = []byte(strings.Repeat("x", 450) + strconv.Itoa(n))
	return m
}

// fill appends until the spool refuses, and returns how many it took.
func fill(t *testing.T, s *Spool) int {
	t.Helper()
	for n := 0; ; n++ {
		_, err := s.Append(context.Background(), bigMsg(n))
		if err != nil {
			require.ErrorIs(t, err, ErrFull)
			return n
		}
		require.Less(t, n, 10000, "the spool never filled")
	}
}

func TestRefuseNewKeepsEverythingStored(t *testing.T) {
	s := open(t, t.TempDir(), small)
	n := fill(t, s)
	st := s.Stats()
	assert.LessOrEqual(t, st.Bytes, small.MaxBytes)
	assert.Greater(t, st.Bytes, small.MaxBytes-2*small.SegmentBytes, "full means nearly full")
	assert.Equal(t, n, st.Messages)
	assert.Zero(t, st.Dropped)

	// Acknowledging frees whole segments, and then there is room again.
	var acked int
	for ; acked < 20; acked++ {
		require.NoError(t, s.Ack(next(t, s).ID))
	}
	_, err := s.Append(context.Background(), bigMsg(n))
	require.NoError(t, err)
	for i := acked; i <= n; i++ {
		assert.Equal(t, "a-"+strconv.Itoa(i), next(t, s).Properties["$.mid"])
	}
	empty(t, s)
}

func TestRefuseNewWhenEverythingIsAcked(t *testing.T) {
	// One segment as large as a quarter of the spool, all of it acknowledged, must not keep
	// new messages out.
	s := open(t, t.TempDir(), Options{MaxBytes: 64 << 10, SegmentBytes: 16 << 10})
	for round := range 20 {
		for i := range 20 {
			_, err := s.Append(context.Background(), bigMsg(round*20+i))
			require.NoError(t, err, "round %d", round)
			require.NoError(t, s.Ack(next(t, s).ID))
		}
	}
	assert.LessOrEqual(t, s.Stats().Bytes, int64(32<<10))
}

func TestDropOldest(t *testing.T) {
	o := small
	o.WhenFull = DropOldest
	s := open(t, t.TempDir(), o)
	const total = 400 // some three times what fits
	ids := make([]ID, total)
	for n := range total {
		id, err := s.Append(context.Background(), bigMsg(n))
		require.NoError(t, err)
		ids[n] = id
		if n == 0 {
			next(t, s) // in flight when its segment is dropped
		}
		assert.LessOrEqual(t, s.Stats().Bytes, o.MaxBytes, "message %d", n)
	}
	st := s.Stats()
	assert.Greater(t, st.Dropped, int64(total/2))
	assert.Equal(t, total, st.Messages+int(st.Dropped), "every message is stored or counted as dropped")
	assert.ErrorIs(t, s.AwaitAck(context.Background(), ids[0]), ErrDropped)
	assert.NoError(t, s.Ack(ids[0]), "the sender's PUBACK for a dropped message is harmless")

	// What is left is the newest messages, in order, with no gap.
	first := total - st.Messages
	for n := first; n < total; n++ {
		require.Equal(t, "a-"+strconv.Itoa(n), next(t, s).Properties["$.mid"])
	}
	empty(t, s)
}

func TestAgeLimit(t *testing.T) {
	c := newClock()
	o := small
	o.MaxAge = time.Hour
	o.Clock = c
	s := open(t, t.TempDir(), o)
	old := appendN(t, s, "old", 0, 60)
	c.Advance(40 * time.Minute)
	assert.Equal(t, 40*time.Minute, s.Stats().OldestAge)
	appendN(t, s, "new", 0, 5)
	c.Advance(21 * time.Minute)

	st := s.Stats()
	assert.Equal(t, 61*time.Minute, st.OldestAge, "expired messages in the last segment wait for Next")
	assert.Greater(t, st.Expired, int64(0), "whole segments past the limit are gone at once")
	assert.Equal(t, 65, st.Messages+int(st.Expired))

	assert.Equal(t, names("new", 0, 5), mids(t, s, 5), "Next skips what is past the limit")
	empty(t, s)
	st = s.Stats()
	assert.Equal(t, int64(60), st.Expired)
	assert.Equal(t, 5, st.Messages)
	assert.Equal(t, 21*time.Minute, st.OldestAge)
	assert.ErrorIs(t, s.AwaitAck(context.Background(), old[0]), ErrExpired)
	assert.ErrorIs(t, s.AwaitAck(context.Background(), old[59]), ErrExpired)
}

func TestAgeLimitSurvivesRestart(t *testing.T) {
	c := newClock()
	dir := t.TempDir()
	o := Options{MaxAge: time.Hour, Clock: c}
	s := open(t, dir, o)
	appendN(t, s, "a", 0, 3)
	require.NoError(t, s.Close())
	c.Advance(2 * time.Hour)
	s = open(t, dir, o)
	assert.Equal(t, 2*time.Hour, s.Stats().OldestAge, "read from the disk after a restart")
	empty(t, s)
	assert.Equal(t, int64(3), s.Stats().Expired)
}

// TestLimitLoweredBelowWhatIsStored reopens a spool with a smaller MaxBytes than its files:
// nothing stored is lost at Open; the policy decides at the next Append.
func TestLimitLoweredBelowWhatIsStored(t *testing.T) {
	src := t.TempDir()
	big := Options{MaxBytes: 1 << 20, SegmentBytes: 4 << 10}
	s := open(t, src, big)
	for n := range 300 {
		_, err := s.Append(context.Background(), bigMsg(n))
		require.NoError(t, err)
	}
	require.NoError(t, s.Close())

	refuse := copyDir(t, src)
	s = open(t, refuse, small)
	assert.Equal(t, 300, s.Stats().Messages)
	_, err := s.Append(context.Background(), bigMsg(300))
	assert.ErrorIs(t, err, ErrFull)

	drop := copyDir(t, src)
	o := small
	o.WhenFull = DropOldest
	s = open(t, drop, o)
	_, err = s.Append(context.Background(), bigMsg(300))
	require.NoError(t, err)
	st := s.Stats()
	assert.LessOrEqual(t, st.Bytes, o.MaxBytes)
	assert.Equal(t, 301, st.Messages+int(st.Dropped))
	got := mids(t, s, st.Messages)
	assert.Equal(t, "a-300", got[len(got)-1])
	assert.Equal(t, "a-"+strconv.Itoa(301-st.Messages), got[0], "the newest are kept, in order")
}

func TestClockGoingBackDoesNotExpire(t *testing.T) {
	c := newClock()
	s := open(t, t.TempDir(), Options{MaxAge: time.Hour, Clock: c})
	appendN(t, s, "a", 0, 1)
	c.Advance(-24 * time.Hour)
	assert.Equal(t, time.Duration(0), s.Stats().OldestAge)
	assert.Equal(t, names("a", 0, 1), mids(t, s, 1))
}
