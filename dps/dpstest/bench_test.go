package dpstest_test

import (
	"crypto/tls"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

// BenchmarkRegistrations measures whole registrations with software keys: TLS handshake
// with a client certificate, CONNECT, SUBSCRIBE, register, one poll, DISCONNECT, with
// retry-after 0 and no assignment delay, client and server in this process. It reports the
// wall-clock rate and the rate per CPU-second of the process (client included), which
// stays meaningful when other work shares the machine: capacity is about that figure times
// the free cores.
func BenchmarkRegistrations(b *testing.B) {
	s := dpstest.NewServer(b, fast, func(c *dpstest.Config) { c.Hubs = []string{"h1", "h2", "h3"} })
	const fleet = 64
	certs := make([]*tls.Certificate, fleet)
	for i := range certs {
		certs[i] = factoryCert(b, s, fmt.Sprintf("bench-%d", i))
	}
	var next atomic.Int64
	b.SetParallelism(4) // several devices at once, as in a fleet test
	cpu0 := cpuTime(b)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := int(next.Add(1)) % fleet
			regID := fmt.Sprintf("bench-%d", i)
			d, err := dial(b, s, dialOpts{regID: regID, cert: certs[i]})
			if err != nil {
				b.Error(err)
				return
			}
			if r := d.provision(regID); r.body.Status != "assigned" {
				b.Errorf("%s: %s", regID, r.raw)
			}
			d.client.Disconnect(0)
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "registrations/s")
	b.ReportMetric(float64(b.N)/(cpuTime(b)-cpu0).Seconds(), "registrations/cpu-s")
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
