package gateway

import (
	"encoding/json"
	"slices"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/localapi"
)

func eventOf(m hub.Message) localapi.Event {
	e := localapi.Event{Type: "c2d", PayloadBase64: m.Payload, Properties: m.Properties}
	if len(m.Payload) > 0 && json.Valid(m.Payload) {
		e.Payload = m.Payload
	}
	return e
}

// subscriber is one application's event stream.
type subscriber struct {
	c2d, desired bool
	methods      []string
	since        time.Time
	events       chan localapi.Event
	done         chan struct{} // closed when the stream is dropped
	closeOnce    sync.Once
}

func (s *subscriber) send(e localapi.Event) bool {
	select {
	case s.events <- e:
		return true
	default:
		return false
	}
}

func (s *subscriber) serves(name string) bool { return slices.Contains(s.methods, name) }

// dropLocked ends a subscriber's stream; g.mu must be held.
func (g *Gateway) dropLocked(s *subscriber) {
	delete(g.subs, s)
	s.closeOnce.Do(func() { close(s.done) })
}

// Subscribe opens an application's event stream. Its first event is "subscribed"; a stream
// of cloud-to-device messages first receives those that arrived while nobody listened.
func (g *Gateway) Subscribe(f localapi.Filter) *localapi.Stream {
	s := &subscriber{
		c2d:     f.C2D,
		desired: f.Desired,
		methods: f.Methods,
		since:   time.Now(),
		events:  make(chan localapi.Event, subscriberBuffer),
		done:    make(chan struct{}),
	}
	s.events <- localapi.Event{Type: "subscribed", Methods: s.methods}
	g.mu.Lock()
	g.subs[s] = struct{}{}
	if s.c2d {
		// Messages that arrived while nobody listened go to the first listener.
		for len(g.backlog) > 0 && len(s.events) < cap(s.events) {
			s.events <- eventOf(g.backlog[0])
			g.backlog = g.backlog[1:]
		}
		close(g.space)
		g.space = make(chan struct{})
	}
	g.mu.Unlock()
	return &localapi.Stream{Events: s.events, Done: s.done, Close: func() {
		g.mu.Lock()
		g.dropLocked(s)
		g.mu.Unlock()
	}}
}
