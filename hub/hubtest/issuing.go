package hubtest

import (
	"testing"
	"time"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/pki"
)

// NewIssuing starts, for a test, DPS with a credential policy (validity) on its factory
// enrollment and one hub that trusts the chains it issues and issues through it, over real
// TLS on loopback, both trusting one root. DPS assigns at once (no Retry-After, no polls).
func NewIssuing(t testing.TB, validity time.Duration) (*dpstest.Server, *Server) {
	t.Helper()
	root, err := pki.NewRoot("issuing root")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(t, WithCA(root))
	fleet := NewFleet(srv.Hub)
	d := dpstest.NewServer(t, func(c *dpstest.Config) {
		c.ServerCA, c.Hubs, c.Registrar = root, fleet.Names(), fleet
		c.RetryAfter, c.PollLimit = 0, 0
	})
	if err := d.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Name: "ops", Validity: validity}); err != nil {
		t.Fatal(err)
	}
	fleet.SetIssuer(d)
	return d, srv
}

// InstantClock is the system clock whose waits end at once: a DPS client's polls go without
// delay, as the emulator assigns without any.
type InstantClock struct{}

func (InstantClock) Now() time.Time { return time.Now() }

func (InstantClock) After(time.Duration) <-chan time.Time {
	ch := make(chan time.Time, 1)
	ch <- time.Now()
	return ch
}
