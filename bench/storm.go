package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/dial"
)

// storm starts Options.Fleet registrations (dps.Register, software keys, in this process)
// within one second against a DPS with a quota of Options.Quota registrations a minute.
// The DPS is dpstest, the emulator's, in this process too: its counters (registrations,
// polls, 429s) are exact, and the emulator's command line does not expose them.
func (h *harness) storm(ctx context.Context) error {
	n, q := h.opts.Fleet, h.opts.Quota
	if n <= 0 || q <= 0 {
		return errors.New("fleet and quota must be positive")
	}
	cfg := dpstest.DefaultConfig()
	cfg.WebSocketAddr = "-"
	cfg.RetryAfter = bootRetryAfter
	cfg.RegistrationsPerMinute = q
	srv, err := dpstest.New(cfg)
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return err
	}
	defer srv.Close()

	certs := make([]tls.Certificate, n)
	for i := range certs {
		leaf, err := srv.FactoryCA().NewDevice(fmt.Sprintf("storm-%05d", i))
		if err != nil {
			return err
		}
		certs[i] = leaf.TLSCertificate()
	}

	optimum := time.Duration(float64(n) / float64(q) * float64(time.Minute))
	ctx, cancel := context.WithTimeout(ctx, 3*optimum+2*time.Minute)
	defer cancel()
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		last     time.Time
		failed   int
		firstErr error
	)
	start := time.Now()
	for i := range n {
		at := start.Add(time.Duration(i) * time.Second / time.Duration(n))
		wg.Go(func() {
			select {
			case <-time.After(time.Until(at)):
			case <-ctx.Done():
			}
			_, err := dps.Register(ctx, dps.Request{
				Endpoint:    srv.Addr(),
				IDScope:     srv.IDScope(),
				Transport:   dial.TransportMQTT,
				RootCAs:     srv.RootCAs(),
				Certificate: &certs[i],
			})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			last = time.Now()
		})
	}
	wg.Wait()
	st := srv.Stats()
	elapsed := last.Sub(start)
	requests := st.Registrations + st.Polls

	r := h.report
	r.add("fleet storm: devices unprovisioned", "", []float64{float64(failed)}, "==", 0, "")
	r.add("fleet storm: time until all assigned", "s", []float64{elapsed.Seconds()}, "", 0,
		fmt.Sprintf("%d devices started within 1 s, quota %d/min: N/Q = %s", n, q, optimum))
	r.add("fleet storm: time / (N/Q)", "", []float64{elapsed.Seconds() / optimum.Seconds()}, "<=", 1.25, "")
	r.add("fleet storm: 429 responses", "", []float64{float64(st.Throttled)}, "", 0,
		fmt.Sprintf("at least N - Q = %d when all start within the quota's minute", max(n-q, 0)))
	r.add("fleet storm: DPS requests / N", "", []float64{float64(requests) / float64(n)}, "<=", 2.5,
		fmt.Sprintf("%d registers and %d polls; the minimum is 2 (register + 1 poll)", st.Registrations, st.Polls))
	if failed > 0 {
		return fmt.Errorf("%d of %d devices were not provisioned; first error: %w", failed, n, firstErr)
	}
	return nil
}
