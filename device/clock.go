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

// Backoff is the delay before retry number attempt (1 for the first retry).
type Backoff func(attempt int) time.Duration

// FullJitter is exponential backoff with full jitter: a uniform delay between zero and
// min·2^(attempt-1), capped at max. Devices that failed together do not retry together.
func FullJitter(min, max time.Duration) Backoff {
	return func(attempt int) time.Duration {
		ceil := max
		if attempt < 1 {
			attempt = 1
		}
		if attempt < 63 {
			if d := min << (attempt - 1); d > 0 && d < max {
				ceil = d
			}
		}
		return time.Duration(rand.Int64N(int64(ceil) + 1))
	}
}

// spread is a uniform random delay in [0, window], to stagger a fleet.
func spread(window time.Duration) time.Duration {
	if window <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(window) + 1))
}
