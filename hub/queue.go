package hub

import (
	"container/list"
	"context"
	"fmt"
	"sync"
)

// Default queue bounds.
const (
	DefaultQueueMessages = 1000
	DefaultQueueBytes    = 4 << 20
)

// Queue holds outgoing telemetry until the hub acknowledges it (PUBACK). It is bounded by a
// message count and a byte total; a message that does not fit is refused with ErrQueueFull,
// never dropped. It lives in memory, outside any one connection, so messages survive
// reconnects and are sent in the order they were queued; one Queue may be handed from one
// Client to the next (the agent does so when DPS moves it to another hub), but only one
// Client's Run may use it at a time. A message in flight when a connection ends is sent
// again on the next one (at-least-once, as MQTT QoS 1).
type Queue struct {
	maxMessages, maxBytes int

	mu      sync.Mutex
	entries list.List // of *entry, in queue order
	bytes   int
	wake    chan struct{} // closed and replaced when an entry becomes sendable
}

type entry struct {
	msg      Message
	size     int
	inflight bool
	elem     *list.Element // nil once acknowledged or withdrawn
	acked    chan struct{}
}

// NewQueue returns a queue of at most maxMessages messages and maxBytes bytes of payload and
// properties; zero or negative values take the defaults.
func NewQueue(maxMessages, maxBytes int) *Queue {
	if maxMessages <= 0 {
		maxMessages = DefaultQueueMessages
	}
	if maxBytes <= 0 {
		maxBytes = DefaultQueueBytes
	}
	return &Queue{maxMessages: maxMessages, maxBytes: maxBytes, wake: make(chan struct{})}
}

// Len returns the number of messages waiting or in flight, and their bytes.
func (q *Queue) Len() (messages, bytes int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.entries.Len(), q.bytes
}

// push queues m and returns its entry, or ErrQueueFull.
func (q *Queue) push(m Message) (*entry, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	e := &entry{msg: m, size: m.size(), acked: make(chan struct{})}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.entries.Len() >= q.maxMessages || q.bytes+e.size > q.maxBytes {
		return nil, fmt.Errorf("%w: %d messages, %d bytes queued (limits %d, %d)",
			ErrQueueFull, q.entries.Len(), q.bytes, q.maxMessages, q.maxBytes)
	}
	e.elem = q.entries.PushBack(e)
	q.bytes += e.size
	q.signal()
	return e, nil
}

// signal wakes next; q.mu must be held.
func (q *Queue) signal() {
	close(q.wake)
	q.wake = make(chan struct{})
}

// next returns the oldest entry not in flight and marks it in flight. It waits until there
// is one, or until ctx or stop ends.
func (q *Queue) next(ctx context.Context, stop <-chan struct{}) (*entry, bool) {
	for {
		q.mu.Lock()
		for el := q.entries.Front(); el != nil; el = el.Next() {
			if e := el.Value.(*entry); !e.inflight {
				e.inflight = true
				q.mu.Unlock()
				return e, true
			}
		}
		wake := q.wake
		q.mu.Unlock()
		select {
		case <-wake:
		case <-stop:
			return nil, false
		case <-ctx.Done():
			return nil, false
		}
	}
}

// ack removes an acknowledged entry and wakes its sender.
func (q *Queue) ack(e *entry) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if e.elem == nil {
		return
	}
	q.entries.Remove(e.elem)
	e.elem = nil
	q.bytes -= e.size
	close(e.acked)
}

// withdraw removes e if it has not been handed to a connection yet, and reports whether it
// did; an entry in flight may still reach the hub and is left to finish.
func (q *Queue) withdraw(e *entry) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if e.elem == nil || e.inflight {
		return false
	}
	q.entries.Remove(e.elem)
	e.elem = nil
	q.bytes -= e.size
	return true
}

// requeue returns every entry in flight to waiting, after a connection ended without their
// PUBACKs; they keep their place, so the next connection sends them first and in order.
func (q *Queue) requeue() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for el := q.entries.Front(); el != nil; el = el.Next() {
		el.Value.(*entry).inflight = false
	}
	q.signal()
}

// Enqueue queues m without waiting; the returned channel is closed when the hub has
// acknowledged it. ErrQueueFull and ErrTooLarge refuse it.
func (q *Queue) Enqueue(m Message) (acked <-chan struct{}, err error) {
	e, err := q.push(m)
	if err != nil {
		return nil, err
	}
	return e.acked, nil
}

// Send queues m and waits until the hub has acknowledged it. If ctx ends first, a message
// not yet handed to a connection is taken back and the error says it was not sent; one
// already published may still be delivered.
func (q *Queue) Send(ctx context.Context, m Message) error {
	e, err := q.push(m)
	if err != nil {
		return err
	}
	select {
	case <-e.acked:
		return nil
	case <-ctx.Done():
		if q.withdraw(e) {
			return fmt.Errorf("telemetry not sent: %w", context.Cause(ctx))
		}
		return fmt.Errorf("telemetry published but not yet acknowledged (it may still arrive): %w", context.Cause(ctx))
	}
}
