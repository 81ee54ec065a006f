package hub

import (
	"context"
	"strings"
	"sync"
	"testing"
)

// FuzzPropertyBag: no property bag a hub sends crashes the decoder, and every map the agent
// encodes into a topic decodes back to itself.
func FuzzPropertyBag(f *testing.F) {
	f.Add("%24.to=%2Fdevices%2Fd%2Fmessages%2FdeviceBound&abc=123", "k", "v")
	f.Add("a&b=&=c&&%zz=100%&x=1+1/", "$.ct", "application/json")
	f.Add("%E0%A4%A=%", "ünï", "çödé & = / ? %")
	f.Fuzz(func(t *testing.T, bag, key, value string) {
		DecodeProperties(bag)
		if key == "" {
			return
		}
		props := map[string]string{key: value}
		got := DecodeProperties(EncodeProperties(props))
		if len(got) != 1 || got[key] != value {
			t.Fatalf("round trip of %q=%q gave %q", key, value, got)
		}
	})
}

// fuzzMessage is an inbound PUBLISH as paho hands it over.
type fuzzMessage struct {
	topic   string
	payload []byte
	mu      sync.Mutex
	acked   bool
}

func (m *fuzzMessage) Duplicate() bool   { return false }
func (m *fuzzMessage) Qos() byte         { return 1 }
func (m *fuzzMessage) Retained() bool    { return false }
func (m *fuzzMessage) Topic() string     { return m.topic }
func (m *fuzzMessage) MessageID() uint16 { return 1 }
func (m *fuzzMessage) Payload() []byte   { return m.payload }
func (m *fuzzMessage) Ack() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.acked = true
}

// FuzzInbound feeds what a hub may publish to the device (twin responses, desired patches,
// method calls, C2D messages, anything else) through the client's router: whatever the topic
// and body, nothing panics, a method is only invoked with a request ID, and desired versions
// never go backwards.
func FuzzInbound(f *testing.F) {
	f.Add("$iothub/twin/res/200/?$rid=1&$version=4", []byte(`{"desired":{"$version":4},"reported":{}}`))
	f.Add("$iothub/twin/res/abc/?$rid=%zz", []byte(`[]`))
	f.Add("$iothub/twin/PATCH/properties/desired/?$version=7", []byte(`{"a":1,"$version":7}`))
	f.Add("$iothub/twin/PATCH/properties/desired/?$version=x", []byte(`{"$version":"seven"}`))
	f.Add("$iothub/methods/POST/reboot/?$rid=9", []byte(`{"delay":3}`))
	f.Add("$iothub/methods/POST/a/b/?$rid=", []byte(`not json`))
	f.Add("$iothub/methods/POST/", []byte(nil))
	f.Add("devices/d/messages/devicebound/%24.mid=1&k=v", []byte("hello"))
	f.Add("devices/d/messages/devicebound/", []byte(nil))
	f.Add("$iothub/unknown", []byte("x"))
	f.Fuzz(func(t *testing.T, topic string, body []byte) {
		var mu sync.Mutex
		var lastDesired int64 = -1 << 63
		c, err := New(Config{
			Hub: "hub.example", DeviceID: "d",
			OnMessage: func(_ context.Context, m Message) bool {
				if string(m.Payload) != string(body) {
					t.Errorf("C2D payload %q, sent %q", m.Payload, body)
				}
				return true
			},
			OnDesired: func(d Desired) {
				mu.Lock()
				defer mu.Unlock()
				if d.Version < lastDesired {
					t.Errorf("desired version went back from %d to %d", lastDesired, d.Version)
				}
				lastDesired = d.Version
			},
			OnMethod: func(_ context.Context, call MethodCall) MethodResponse {
				if !strings.Contains(topic, "?") {
					t.Errorf("method %q invoked from a topic without a query: %q", call.Name, topic)
				}
				if call.Payload != nil && string(call.Payload) != string(body) {
					t.Errorf("method payload %q, sent %q", call.Payload, body) // passed on as sent
				}
				return MethodResponse{Status: 200}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		r := newRunState(ctx, c)
		in := c.inbound(r, &conn{lost: make(chan struct{})})
		in(nil, &fuzzMessage{topic: topic, payload: body})
		// The same topic twice: a redelivery must be as harmless as the first.
		in(nil, &fuzzMessage{topic: topic, payload: body})
		cancel()
		r.wait()
	})
}

// FuzzSectionVersion: a twin section or patch of any shape gives a version, never a panic.
func FuzzSectionVersion(f *testing.F) {
	f.Add([]byte(`{"$version":3}`))
	f.Add([]byte(`{"$version":"3"}`))
	f.Add([]byte(`{"$version":1e30}`))
	f.Add([]byte(`[1,2]`))
	f.Fuzz(func(t *testing.T, section []byte) {
		sectionVersion(section)
	})
}
