// Package backoff spaces retries: exponential growth with full jitter, so that a fleet cut
// off at once does not come back at once. It computes waits; callers wait, on their own clock.
package backoff

import (
	"math/rand/v2"
	"time"
)

// FullJitter returns waits uniformly random between zero and Ceiling(base, max, attempt).
func FullJitter(base, max time.Duration) func(attempt int) time.Duration {
	return func(attempt int) time.Duration {
		return Jitter(Ceiling(base, max, attempt))
	}
}

// Ceiling is the longest wait before retry number attempt (1 for the first retry after a
// failure): base·2^(attempt-1), capped at max.
func Ceiling(base, max time.Duration, attempt int) time.Duration {
	limit := base
	for i := 1; i < attempt && limit > 0 && limit < max; i++ {
		limit *= 2
	}
	return min(limit, max)
}

// Jitter is a uniformly random duration in [0, d]; zero when d is not positive.
func Jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return rand.N(d + 1)
}
