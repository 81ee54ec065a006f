package telemetry

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/spool"
)

// Queue is what Forward needs of the hub session's telemetry queue; *hub.Queue has it. That
// queue lives outside any one connection, sends again what a dropped connection left
// unacknowledged, and is handed from one hub client to the next when DPS moves the device:
// Forward carries on through all of that without knowing of it.
type Queue interface {
	// Enqueue queues m or refuses it: hub.ErrQueueFull for now, any other error for good.
	// acked is closed when the hub has acknowledged m.
	Enqueue(m hub.Message) (acked <-chan struct{}, err error)
}

// queueFullRetry is how long Forward waits before trying a full hub queue again when none
// of its own messages is acknowledged meanwhile: the queue is full of others' messages.
const queueFullRetry = time.Second

var errForwarding = errors.New("telemetry: a Forward is already running")

// Forward moves stored messages into q, oldest first, and removes each from the spool once
// q reports its PUBACK, until ctx ends (returning its cause) or the store is closed
// (ErrClosed). The messages in q at a time are as many as q takes: when it is full, Forward
// waits for room and tries the same message again, losing none. One Forward runs at a time.
//
// When Forward returns, the messages it left in q unacknowledged go back to the front of the
// spool, and the next Forward sends them again: those that q still delivers arrive twice.
func (s *Store) Forward(ctx context.Context, q Queue) error {
	select {
	case s.forwarding <- struct{}{}:
	default:
		return errForwarding
	}
	defer func() { <-s.forwarding }()

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	w := &window{changed: make(chan struct{})}
	acking := make(chan struct{})
	go func() {
		defer close(acking)
		if err := s.ackInOrder(ctx, w); err != nil {
			cancel(err)
		}
	}()
	cancel(s.feed(ctx, q, w))
	<-acking
	s.ackDelivered(w)
	s.spool.Requeue()
	err := context.Cause(ctx)
	if errors.Is(err, spool.ErrClosed) {
		return kind(ErrClosed, err)
	}
	return err
}

// feed hands messages from the spool to q until it fails or ctx ends.
func (s *Store) feed(ctx context.Context, q Queue, w *window) error {
	for {
		rec, err := s.spool.Next(ctx)
		if err != nil {
			return err
		}
		if err := s.hand(ctx, q, w, rec); err != nil {
			return err
		}
	}
}

// hand puts rec into q, waiting for room while q is full.
func (s *Store) hand(ctx context.Context, q Queue, w *window, rec spool.Record) error {
	m := hub.Message{Payload: rec.Payload, Properties: rec.Properties}
	for {
		// Taken before Enqueue, so that an acknowledgement in between is not missed.
		changed := w.watch()
		acked, err := q.Enqueue(m)
		switch {
		case err == nil:
			w.push(flight{rec.ID, acked})
			return nil
		case !errors.Is(err, hub.ErrQueueFull):
			// Submit refuses what the hub never takes, so this was stored by a version with
			// other limits: kept, it would hold up every message behind it for ever.
			s.rejected.Add(1)
			return s.spool.Ack(rec.ID)
		}
		select {
		case <-changed:
		case <-s.clock.After(queueFullRetry):
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

// ackInOrder acknowledges in the spool each message of the window as q reports its PUBACK.
// It waits on the oldest: q sends in order and the hub acknowledges in order, so one
// goroutine serves the whole window at no cost in latency.
func (s *Store) ackInOrder(ctx context.Context, w *window) error {
	for {
		f, changed, ok := w.front()
		if !ok {
			select {
			case <-changed:
				continue
			case <-ctx.Done():
				return nil
			}
		}
		select {
		case <-f.acked:
		case <-ctx.Done():
			return nil
		}
		if err := s.spool.Ack(f.id); err != nil {
			return err
		}
		w.pop()
	}
}

// ackDelivered acknowledges, as Forward stops, the messages whose PUBACK came out of order
// or after ackInOrder stopped, so that the next Forward does not send them again.
func (s *Store) ackDelivered(w *window) {
	for _, f := range w.flights {
		select {
		case <-f.acked:
			s.spool.Ack(f.id) // a closed spool keeps them for the next run: a duplicate, not a loss
		default:
		}
	}
}

// flight is a message in q waiting for its PUBACK.
type flight struct {
	id    spool.ID
	acked <-chan struct{}
}

// window is the messages Forward has in q, oldest first.
type window struct {
	mu      sync.Mutex
	flights []flight
	changed chan struct{} // closed and replaced when a message joins or leaves
}

func (w *window) watch() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.changed
}

func (w *window) front() (flight, <-chan struct{}, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.flights) == 0 {
		return flight{}, w.changed, false
	}
	return w.flights[0], w.changed, true
}

func (w *window) push(f flight) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.flights = append(w.flights, f)
	w.signalLocked()
}

func (w *window) pop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.flights[0] = flight{}
	w.flights = w.flights[1:]
	w.signalLocked()
}

func (w *window) signalLocked() {
	close(w.changed)
	w.changed = make(chan struct{})
}
