package device

import (
	"math/rand/v2"
	"time"
)

// Clock is the wall clock and timers as the agent sees them, so that tests (and the
// "clock in 1970" scenario) control time.
type Clock interface {
	Now() time.Time
	// After delivers once d has passed.
	After(d time.Duration) <-chan time.Time
}

// SystemClock is the real clock.
type SystemClock struct{}

func (SystemClock) Now() time.Time                         { return time.Now() }
func (SystemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// spread is a uniform random delay in [0, window], to stagger a fleet.
func spread(window time.Duration) time.Duration {
	if window <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(window) + 1))
}
