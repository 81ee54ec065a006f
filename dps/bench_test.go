package dps_test

import (
	"sync"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/dial"
)

// waitingClock waits for real and adds up how long it was asked to.
type waitingClock struct {
	mu     sync.Mutex
	waited time.Duration
}

func (c *waitingClock) Now() time.Time { return time.Now() }

func (c *waitingClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	c.waited += d
	c.mu.Unlock()
	return time.After(d)
}

// BenchmarkRegister measures one X.509 registration against the emulator as Azure paces it
// (retry-after 1 s, which the client raises to DPS's 2 s poll limit) with no assignment
// delay. ns/op includes that wait; wall-ns-excl-wait/op is what the client itself costs
// (TLS, MQTT, JSON, the emulator's own work). allocs/op counts the in-process emulator too.
func BenchmarkRegister(b *testing.B) {
	s := dpstest.NewServer(b, func(c *dpstest.Config) { c.RetryAfter, c.AssignDelay = time.Second, 0 })
	clock := &waitingClock{}
	req := dps.Request{
		Endpoint:    s.Addr(),
		IDScope:     s.IDScope(),
		Transport:   dial.TransportMQTT,
		RootCAs:     s.RootCAs(),
		Certificate: deviceCert(b, s, "gw-bench"),
		Clock:       clock,
	}
	b.ReportAllocs()
	start := time.Now()
	for b.Loop() {
		if _, err := dps.Register(b.Context(), req); err != nil {
			b.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	b.ReportMetric(float64(elapsed-clock.waited)/float64(b.N), "wall-ns-excl-wait/op")
	b.ReportMetric(clock.waited.Seconds()/float64(b.N), "s-waited/op")
}
