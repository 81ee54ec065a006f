package spool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/internal/clock"
)

// Defaults for a gateway with little flash. 16 MiB holds some 30,000 messages of half a
// kilobyte, a day and more of a busy gateway's telemetry, and is a small part of even a 512
// MiB eMMC. Seven days is the longest IoT Hub itself keeps device-to-cloud messages: what is
// older has outlived the retention its readers were built for.
const (
	DefaultMaxBytes = 16 << 20
	DefaultMaxAge   = 7 * 24 * time.Hour
	// MinMaxBytes is the smallest queue Open accepts.
	MinMaxBytes = 64 << 10
)

// Segment sizes: MaxBytes/16 within these bounds, so that reclaiming or dropping one
// segment frees a sixteenth of the queue, and deleting one file erases whole flash blocks.
const (
	minSegmentBytes = 4 << 10
	maxSegmentBytes = 4 << 20
)

// ackSyncInterval bounds how long an advance of the acknowledgement state waits for its
// fdatasync: after a power cut, at most this much of the sender's progress is sent again.
const ackSyncInterval = time.Second

// Sentinels callers branch on with errors.Is.
var (
	// ErrFull: the queue is at MaxBytes under RefuseNew, or the file system is full. Nothing
	// was stored; the application keeps the message and retries later.
	ErrFull = errors.New("telemetry spool is full")
	// ErrTooLarge: the message can never fit (MaxMessageBytes, or a quarter of MaxBytes).
	ErrTooLarge = errors.New("message too large for the telemetry spool")
	// ErrDropped: AwaitAck's message left the queue unsent: dropped to make room under
	// DropOldest, or unreadable (damaged on the medium).
	ErrDropped = errors.New("message dropped from the telemetry spool unsent")
	// ErrExpired: AwaitAck's message left the queue unsent, older than MaxAge.
	ErrExpired = errors.New("message expired in the telemetry spool unsent")
	// ErrUnknownID: Ack or AwaitAck of an ID that Next has not handed out (Ack) or Append has
	// not returned (AwaitAck).
	ErrUnknownID = errors.New("no such message in the telemetry spool")
	// ErrLocked: another process has the spool open.
	ErrLocked = errors.New("telemetry spool is open in another process")
	// ErrClosed: the spool was closed.
	ErrClosed = errors.New("telemetry spool is closed")
)

// ID identifies a message in the spool: IDs rise in append order. They are the spool's own;
// a back end deduplicates on the message's "$.mid" property, which the spool keeps.
type ID uint64

// Message is telemetry as an application handed it over.
type Message struct {
	// App names the application the message came from.
	App string
	// Properties are the message's properties as the hub takes them, "$.mid" among them: the
	// caller sets it, so that every delivery of the message carries the same one.
	Properties map[string]string
	Payload    []byte
}

// Record is a stored message.
type Record struct {
	ID   ID
	Time time.Time // when it was appended
	Message
}

// Policy is what Append does when the queue is at MaxBytes.
type Policy int

const (
	// RefuseNew refuses the message with ErrFull: nothing stored is lost, and the
	// application learns at once that the gateway cannot keep more.
	RefuseNew Policy = iota
	// DropOldest removes the oldest segment of messages, sent or not, and counts them in
	// Stats.Dropped: the newest data matters more.
	DropOldest
)

var policyNames = map[Policy]string{RefuseNew: "refuse-new", DropOldest: "drop-oldest"}

func (p Policy) String() string {
	if n, ok := policyNames[p]; ok {
		return n
	}
	return fmt.Sprintf("Policy(%d)", int(p))
}

// MarshalText and UnmarshalText make a Policy a config value: "refuse-new" or "drop-oldest".
func (p Policy) MarshalText() ([]byte, error) {
	if _, ok := policyNames[p]; !ok {
		return nil, fmt.Errorf("unknown policy %d", int(p))
	}
	return []byte(p.String()), nil
}

func (p *Policy) UnmarshalText(b []byte) error {
	for v, n := range policyNames {
		if n == string(b) {
			*p = v
			return nil
		}
	}
	return fmt.Errorf("unknown policy %q: want refuse-new or drop-oldest", b)
}

// Options bound the queue; the zero value takes the defaults.
type Options struct {
	MaxBytes int64         // size of the segment files; 0: DefaultMaxBytes
	MaxAge   time.Duration // older messages are removed unsent; 0: DefaultMaxAge
	WhenFull Policy        // the zero value is RefuseNew
	// SegmentBytes is the size at which a segment file is closed and the next begun; 0:
	// MaxBytes/16 between 4 KiB and 4 MiB. At most MaxBytes/4.
	SegmentBytes int64
	// Clock stamps and ages messages and paces the acknowledgement state's fdatasync; nil:
	// the system clock.
	Clock clock.Clock
}

func (o Options) resolve() (Options, error) {
	if o.MaxBytes == 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.MaxAge == 0 {
		o.MaxAge = DefaultMaxAge
	}
	if o.SegmentBytes == 0 {
		o.SegmentBytes = min(max(o.MaxBytes/16, minSegmentBytes), maxSegmentBytes)
	}
	if o.Clock == nil {
		o.Clock = clock.System{}
	}
	switch {
	case o.MaxBytes < MinMaxBytes:
		return o, fmt.Errorf("spool size %d bytes is below the minimum of %d", o.MaxBytes, MinMaxBytes)
	case o.MaxAge < 0:
		return o, fmt.Errorf("spool age limit %s is negative", o.MaxAge)
	case o.SegmentBytes < minSegmentBytes || o.SegmentBytes > o.MaxBytes/4:
		return o, fmt.Errorf("spool segment size %d bytes is outside %d..%d (a quarter of the spool)", o.SegmentBytes, minSegmentBytes, o.MaxBytes/4)
	}
	if _, ok := policyNames[o.WhenFull]; !ok {
		return o, fmt.Errorf("unknown spool policy %d", int(o.WhenFull))
	}
	return o, nil
}

// Stats is what the status and the twin show of the queue. Counters start at zero at Open.
type Stats struct {
	Messages int   // stored and not acknowledged, in flight included
	InFlight int   // handed out by Next since the last Requeue and not acknowledged
	Bytes    int64 // size of the segment files: what MaxBytes bounds
	// OldestAge is the age of the oldest message not acknowledged; 0 when there is none.
	OldestAge time.Duration
	Dropped   int64 // messages removed unsent to make room (DropOldest)
	Expired   int64 // messages removed unsent, older than MaxAge
	// Torn counts damaged stretches skipped: a record cut short by a crash (found and
	// truncated by Open), or bytes damaged on the medium. Each held at least one record.
	Torn int64
	// SetAside counts files Open renamed aside (*.corrupt-*), found unusable as segments.
	SetAside int
	// Written is the bytes written to the files: what the queue costs the flash, before the
	// file system's own overhead.
	Written int64
}

// Spool is an open queue directory. Append may be called from any number of goroutines;
// Next, Ack and Requeue are meant for one sender, though concurrent calls are safe.
type Spool struct {
	dir  string
	dirf *os.File // the directory, synced after creating, renaming or removing in it
	opts Options
	lock *os.File
	acks *ackFile // the writer's alone once Open returns

	mu       sync.Mutex
	segs     []*segment // oldest first; the writer appends to the last
	nextID   ID
	disk     int64  // bytes in segs' files
	reserved int64  // bytes appends waiting for the writer may add
	batch    *batch // appends the writer has not taken yet
	doomed   []*segment
	// window holds what Next handed out since the oldest record not released, in ID order;
	// resend is how many of them went out since the last Requeue.
	window   []*flight
	resend   int
	cursor   cursor
	released ID // every record below it is acknowledged, dropped or expired
	fates    []fate
	waiters  map[ID]*waiter
	wake     chan struct{} // closed and replaced when Next may find something new
	counts   Stats
	closed   bool
	broken   error // a failed write that could not be undone: Append refuses from then on
	ackErr   error // the last failure to save the acknowledgement state

	kick   chan struct{}
	exited chan struct{}
}

// cursor is where Next reads the next record not yet handed out.
type cursor struct {
	seg  *segment
	off  int64
	prev ID // the last record passed
}

// flight is a record Next handed out.
type flight struct {
	id       ID
	seg      *segment
	off      int64
	time     int64
	released bool
}

// fate records why IDs left the queue unsent, for AwaitAck calls that come late.
type fate struct {
	first, last ID
	err         error
}

const maxFates = 64

type waiter struct {
	done  chan struct{}
	err   error
	count int
}

// batch is appends that share one write and one fdatasync.
type batch struct {
	recs     [][]byte
	ids      []ID
	times    []int64
	reserved int64
	done     chan struct{}
	err      error
}

func unixTime(ns int64) time.Time { return time.Unix(0, ns) }

// Append stores m and returns once it is durable: on the medium, surviving a power cut.
// Concurrent appends share writes and fdatasyncs. If ctx ends first, Append returns its
// error and the message may or may not be stored; a retry may store it twice, under the
// same "$.mid". ErrFull and ErrTooLarge refuse it.
func (s *Spool) Append(ctx context.Context, m Message) (ID, error) {
	rec, err := encodeRecord(m)
	if err != nil {
		return 0, err
	}
	if int64(len(rec)) > s.opts.MaxBytes/4 {
		return 0, fmt.Errorf("%w: %d bytes, a quarter of the spool's %d", ErrTooLarge, len(rec), s.opts.MaxBytes)
	}
	need := int64(len(rec)) + segmentHeader
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		return 0, ErrClosed
	case s.broken != nil:
		s.mu.Unlock()
		return 0, fmt.Errorf("cannot store the message: %w", s.broken)
	}
	now := s.opts.Clock.Now()
	s.expireLocked(now)
	for s.disk+s.reserved+need > s.opts.MaxBytes {
		if s.opts.WhenFull != DropOldest || len(s.segs) < 2 {
			err := fmt.Errorf("%w: %d bytes stored and %d arriving, limit %d", ErrFull, s.disk, s.reserved, s.opts.MaxBytes)
			s.mu.Unlock()
			return 0, err
		}
		s.counts.Dropped += int64(s.dropFrontLocked(ErrDropped))
	}
	id := s.nextID
	s.nextID++
	seal(rec, id, now.UnixNano())
	if s.batch == nil {
		s.batch = &batch{done: make(chan struct{})}
	}
	b := s.batch
	b.recs = append(b.recs, rec)
	b.ids = append(b.ids, id)
	b.times = append(b.times, now.UnixNano())
	b.reserved += need
	s.reserved += need
	s.mu.Unlock()
	s.kickWriter()
	select {
	case <-b.done:
		if b.err != nil {
			return 0, b.err
		}
		return id, nil
	case <-ctx.Done():
		return 0, fmt.Errorf("message not known to be stored: %w", context.Cause(ctx))
	}
}

// Next hands out the oldest message not in flight, waiting for one until ctx ends. After a
// Requeue that is the oldest not acknowledged. Messages older than MaxAge are skipped and
// counted in Stats.Expired.
func (s *Spool) Next(ctx context.Context) (Record, error) {
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return Record{}, ErrClosed
		}
		s.expireLocked(s.opts.Clock.Now())
		var f *flight
		var seg *segment
		var off int64
		if s.resend < len(s.window) {
			f = s.window[s.resend]
			if f.released {
				s.resend++
				s.mu.Unlock()
				continue
			}
			seg, off = f.seg, f.off
		} else {
			s.advanceCursorLocked()
			c := s.cursor
			if c.seg == nil || c.off >= c.seg.size {
				wake := s.wake
				s.mu.Unlock()
				select {
				case <-wake:
					continue
				case <-ctx.Done():
					return Record{}, context.Cause(ctx)
				}
			}
			seg, off = c.seg, c.off
		}
		end := seg.size
		s.mu.Unlock()

		// The read runs unlocked, so a slow medium does not hold up Append; what it read is
		// used only if nothing moved meanwhile.
		rec, next, err := readRecord(seg.f, off, end)

		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return Record{}, ErrClosed
		}
		if f != nil && (s.resend >= len(s.window) || s.window[s.resend] != f) ||
			f == nil && (s.resend != len(s.window) || s.cursor.seg != seg || s.cursor.off != off) {
			s.mu.Unlock()
			continue
		}
		if err != nil {
			s.damagedLocked(f, seg, off, err)
			s.mu.Unlock()
			continue
		}
		if f == nil {
			f = &flight{id: rec.ID, seg: seg, off: off, time: rec.Time.UnixNano()}
			s.window = append(s.window, f)
			seg.consumed++
			s.cursor.off, s.cursor.prev = next, rec.ID
		}
		s.resend++
		if s.opts.Clock.Now().Sub(rec.Time) > s.opts.MaxAge {
			s.counts.Expired++
			s.releaseLocked(f, ErrExpired)
			s.mu.Unlock()
			continue
		}
		s.mu.Unlock()
		return rec, nil
	}
}

// Ack removes a message Next handed out: the hub has it (PUBACK). Acknowledgements may come
// in any order; a message dropped or expired meanwhile is already gone, and acknowledging it
// again is not an error.
func (s *Spool) Ack(id ID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if f := s.flightLocked(id); f != nil {
		if !f.released {
			s.releaseLocked(f, nil)
		}
		return nil
	}
	if id < s.released {
		return nil
	}
	return fmt.Errorf("ack of message %d: %w", id, ErrUnknownID)
}

// Requeue returns every message in flight to the queue, after a connection ended without
// their acknowledgements: Next hands them out again first, in order.
func (s *Spool) Requeue() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.resend = 0
	s.signalLocked()
}

// AwaitAck waits until message id is acknowledged, or leaves the queue unsent (ErrDropped,
// ErrExpired), or ctx ends. The message stays queued when ctx ends.
func (s *Spool) AwaitAck(ctx context.Context, id ID) error {
	s.mu.Lock()
	if id >= s.nextID || id == 0 {
		s.mu.Unlock()
		return fmt.Errorf("await message %d: %w", id, ErrUnknownID)
	}
	if err, gone := s.fateLocked(id); gone {
		s.mu.Unlock()
		return err
	}
	if f := s.flightLocked(id); id < s.released || f != nil && f.released {
		s.mu.Unlock()
		return nil // acknowledged
	}
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	w := s.waiters[id]
	if w == nil {
		w = &waiter{done: make(chan struct{})}
		s.waiters[id] = w
	}
	w.count++
	s.mu.Unlock()
	select {
	case <-w.done:
		return w.err
	case <-ctx.Done():
		s.mu.Lock()
		if w.count--; w.count == 0 && s.waiters[id] == w {
			delete(s.waiters, id)
		}
		s.mu.Unlock()
		return context.Cause(ctx)
	}
}

// Stats returns the queue's figures now.
func (s *Spool) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.opts.Clock.Now()
	s.expireLocked(now)
	st := s.counts
	st.Bytes = s.disk
	for _, seg := range s.segs {
		st.Messages += seg.records - seg.released
	}
	for _, f := range s.window[:s.resend] {
		if !f.released {
			st.InFlight++
		}
	}
	if oldest, ok := s.oldestLocked(); ok {
		st.OldestAge = max(now.Sub(unixTime(oldest)), 0)
	}
	return st
}

// Close waits for appends under way to finish, saves the acknowledgement state and closes
// the files. Next and AwaitAck calls waiting return ErrClosed.
func (s *Spool) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for id, w := range s.waiters {
		w.err = ErrClosed
		close(w.done)
		delete(s.waiters, id)
	}
	s.signalLocked()
	s.mu.Unlock()
	s.kickWriter()
	<-s.exited

	s.mu.Lock()
	defer s.mu.Unlock()
	errs := []error{s.ackErr}
	for _, seg := range s.segs {
		errs = append(errs, seg.f.Close())
	}
	errs = append(errs, s.acks.f.Close(), s.lock.Close(), s.dirf.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cannot close the telemetry spool %s: %w", s.dir, err)
	}
	return nil
}

// oldestLocked returns the append time of the oldest record not released.
func (s *Spool) oldestLocked() (int64, bool) {
	if len(s.window) > 0 {
		return s.window[0].time, true // the front of the window is never released
	}
	s.advanceCursorLocked()
	c := s.cursor
	if c.seg == nil || c.off >= c.seg.size {
		return 0, false
	}
	rec, _, err := readRecord(c.seg.f, c.off, c.seg.size)
	if err != nil {
		return 0, false
	}
	return rec.Time.UnixNano(), true
}

func (s *Spool) flightLocked(id ID) *flight {
	i := sort.Search(len(s.window), func(i int) bool { return s.window[i].id >= id })
	if i < len(s.window) && s.window[i].id == id {
		return s.window[i]
	}
	return nil
}

// releaseLocked takes a handed-out record off the queue: acknowledged (err nil), or expired
// or unreadable.
func (s *Spool) releaseLocked(f *flight, err error) {
	f.released = true
	f.seg.released++
	if err != nil {
		s.noteFateLocked(f.id, f.id, err)
	}
	s.settleLocked(f.id, f.id, err)
	s.popReleasedLocked()
}

// popReleasedLocked takes released records off the front of the window, so that its front
// is the oldest record not released, moves the released mark up to it and removes the
// segments left empty.
func (s *Spool) popReleasedLocked() {
	n := 0
	for n < len(s.window) && s.window[n].released {
		n++
	}
	s.window = s.window[n:]
	s.resend = max(s.resend-n, 0)
	if len(s.window) > 0 {
		s.raiseReleasedLocked(s.window[0].id)
	} else {
		s.raiseReleasedLocked(s.cursor.prev + 1)
	}
	s.trimLocked()
}

// settleLocked ends the AwaitAck calls waiting for IDs first..last.
func (s *Spool) settleLocked(first, last ID, err error) {
	if first == last {
		if w := s.waiters[first]; w != nil {
			w.err = err
			close(w.done)
			delete(s.waiters, first)
		}
		return
	}
	for id, w := range s.waiters {
		if id >= first && id <= last {
			w.err = err
			close(w.done)
			delete(s.waiters, id)
		}
	}
}

func (s *Spool) noteFateLocked(first, last ID, err error) {
	if n := len(s.fates); n > 0 && s.fates[n-1].err == err && s.fates[n-1].last+1 >= first {
		s.fates[n-1].last = max(s.fates[n-1].last, last)
		return
	}
	s.fates = append(s.fates, fate{first, last, err})
	if len(s.fates) > maxFates {
		s.fates = s.fates[len(s.fates)-maxFates:]
	}
}

// fateLocked says whether id left the queue unsent, and why.
func (s *Spool) fateLocked(id ID) (error, bool) {
	for _, f := range s.fates {
		if id >= f.first && id <= f.last {
			return f.err, true
		}
	}
	return nil, false
}

func (s *Spool) raiseReleasedLocked(w ID) {
	if w > s.released {
		s.released = w
		s.kickWriter()
	}
}

// advanceCursorLocked moves the cursor over holes and onto the next segment at the end of
// one.
func (s *Spool) advanceCursorLocked() {
	for s.cursor.seg != nil {
		seg := s.cursor.seg
		if next, ok := seg.holes[s.cursor.off]; ok {
			s.cursor.off = next
			continue
		}
		if s.cursor.off < seg.size {
			return
		}
		i := s.indexLocked(seg)
		if i == len(s.segs)-1 {
			return
		}
		next := s.segs[i+1]
		s.cursor = cursor{seg: next, off: segmentHeader, prev: max(s.cursor.prev, next.first-1)}
	}
}

func (s *Spool) indexLocked(seg *segment) int {
	for i, x := range s.segs {
		if x == seg {
			return i
		}
	}
	return -1
}

// damagedLocked handles a record Next could not read. Handed out before, it leaves the
// queue as dropped. At the cursor, the segment's rest is scanned again: the damage becomes
// holes up to the next intact records, and the records it held leave the queue as dropped.
func (s *Spool) damagedLocked(f *flight, seg *segment, off int64, cause error) {
	if f != nil {
		s.counts.Torn++
		s.releaseLocked(f, ErrDropped)
		return
	}
	before := noLimit
	if i := s.indexLocked(seg); i+1 < len(s.segs) {
		before = s.segs[i+1].first
	}
	sc := scan{end: off, damaged: 1, tail: true, lost: []fate{{first: s.cursor.prev + 1, last: noLimit}}}
	if errors.Is(cause, errCorrupt) {
		if data, err := readRange(seg.f, 0, seg.size); err == nil {
			// IDs in order before: Open checked them, and the writer wrote them.
			sc, _ = scanSegment(data, off, s.cursor.prev, before, 0)
		}
	}
	s.counts.Torn += int64(sc.damaged)
	if seg.holes == nil {
		seg.holes = make(map[int64]int64)
	}
	for from, to := range sc.holes {
		seg.holes[from] = to
	}
	if sc.tail {
		seg.holes[sc.end] = seg.size
	}
	seg.records = seg.consumed + sc.records
	for _, l := range sc.lost {
		last := min(l.last, seg.last)
		if l.first <= last {
			s.noteFateLocked(l.first, last, ErrDropped)
			s.settleLocked(l.first, last, ErrDropped)
		}
	}
	s.trimLocked()
}

func readRange(f *os.File, off, end int64) ([]byte, error) {
	data := make([]byte, end-off)
	_, err := f.ReadAt(data, off)
	return data, err
}

// trimLocked removes the oldest segments once all their records are released, keeping the
// last: the writer appends to it.
func (s *Spool) trimLocked() {
	s.advanceCursorLocked()
	for len(s.segs) > 1 && s.segs[0].released == s.segs[0].records && s.cursor.seg != s.segs[0] {
		s.removeFrontLocked()
	}
}

// dropFrontLocked removes the oldest segment, sent or not, and returns how many records in
// it were not yet released; err says why (ErrDropped, ErrExpired).
func (s *Spool) dropFrontLocked(err error) int {
	seg := s.segs[0]
	lost := seg.records - seg.released
	n := 0
	for n < len(s.window) && s.window[n].seg == seg {
		n++
	}
	s.window = s.window[n:]
	s.resend = max(s.resend-n, 0)
	if s.cursor.seg == seg {
		next := s.segs[1]
		s.cursor = cursor{seg: next, off: segmentHeader, prev: max(seg.last, next.first-1)}
	}
	if lost > 0 {
		// IDs below the released mark left earlier, with their own fate.
		first := max(seg.first, s.released)
		s.noteFateLocked(first, seg.last, err)
		s.settleLocked(first, seg.last, err)
	}
	s.removeFrontLocked()
	s.popReleasedLocked()
	return lost
}

// removeFrontLocked hands the oldest segment to the writer for deletion.
func (s *Spool) removeFrontLocked() {
	seg := s.segs[0]
	s.segs = s.segs[1:]
	s.disk -= seg.size
	s.doomed = append(s.doomed, seg)
	s.raiseReleasedLocked(seg.last + 1)
	s.kickWriter()
}

// expireLocked drops the oldest segments whose newest record is older than MaxAge; Next
// skips older records in the segments that remain.
func (s *Spool) expireLocked(now time.Time) {
	cutoff := now.Add(-s.opts.MaxAge).UnixNano()
	for len(s.segs) > 1 && s.segs[0].newest < cutoff {
		s.counts.Expired += int64(s.dropFrontLocked(ErrExpired))
	}
}

// signalLocked wakes the Next calls waiting.
func (s *Spool) signalLocked() {
	close(s.wake)
	s.wake = make(chan struct{})
}

func (s *Spool) kickWriter() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}
