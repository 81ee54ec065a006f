package hub

import (
	"context"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// maxInbox bounds deliveries waiting for OnMessage and OnDesired. The hub keeps at most 50
// cloud-to-device messages unacknowledged and the agent acknowledges only what it delivered,
// so this is reached only by a hub that ignores its own limits.
const maxInbox = 1000

// runState lives as long as one Run: the dispatch goroutine that calls OnMessage and
// OnDesired in order, and the method handlers in flight.
type runState struct {
	ctx context.Context
	c   *Client

	mu    sync.Mutex
	inbox []func()
	wake  chan struct{}

	dispatcher sync.WaitGroup
	methods    sync.WaitGroup
	methodSem  chan struct{}
}

func newRunState(ctx context.Context, c *Client) *runState {
	r := &runState{ctx: ctx, c: c, wake: make(chan struct{}, 1), methodSem: make(chan struct{}, maxMethods)}
	r.dispatcher.Add(1)
	go r.dispatch()
	return r
}

// wait returns when the dispatcher and every method handler have finished; ctx has ended.
func (r *runState) wait() {
	r.dispatcher.Wait()
	r.methods.Wait()
}

// drainMethods waits up to d for method handlers to answer.
func (r *runState) drainMethods(d time.Duration) {
	done := make(chan struct{})
	go func() {
		r.methods.Wait()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// deliver queues f for the dispatcher; false when the inbox is full.
func (r *runState) deliver(f func()) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.inbox) >= maxInbox {
		return false
	}
	r.inbox = append(r.inbox, f)
	select {
	case r.wake <- struct{}{}:
	default:
	}
	return true
}

func (r *runState) dispatch() {
	defer r.dispatcher.Done()
	for {
		r.mu.Lock()
		batch := r.inbox
		r.inbox = nil
		r.mu.Unlock()
		for _, f := range batch {
			if r.ctx.Err() != nil {
				return
			}
			f()
		}
		select {
		case <-r.wake:
		case <-r.ctx.Done():
			return
		}
	}
}

// inbound routes what the hub publishes to this connection. It runs on paho's router
// goroutine and must not block: responses are handed over, deliveries queued, methods run
// on their own goroutines.
func (c *Client) inbound(r *runState, cn *conn) mqtt.MessageHandler {
	return func(_ mqtt.Client, m mqtt.Message) {
		topic := m.Topic()
		switch {
		case strings.HasPrefix(topic, twinResPrefix):
			c.twinResponse(topic, m.Payload())
			m.Ack()
		case strings.HasPrefix(topic, desiredPatchPrefix):
			c.desiredPatch(r, m.Payload())
			m.Ack()
		case strings.HasPrefix(topic, methodPrefix):
			c.methodCall(r, topic, m.Payload())
			m.Ack()
		case strings.HasPrefix(topic, credentialsResPrefix):
			c.credentialsResponse(topic, m.Payload())
			m.Ack()
		case strings.Contains(topic, "/messages/devicebound/"):
			_, bag, _ := strings.Cut(topic, "/messages/devicebound/")
			msg := Message{Payload: m.Payload(), Properties: DecodeProperties(bag)}
			// Not acknowledged when the inbox is full or nobody listens: the hub redelivers
			// it on the next session.
			if c.cfg.OnMessage != nil {
				r.deliver(func() {
					if c.cfg.OnMessage(r.ctx, msg) {
						m.Ack()
					}
				})
			}
		default:
			m.Ack()
		}
	}
}
