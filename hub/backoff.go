package hub

import (
	"math/rand/v2"
	"time"
)

// Backoff returns how long to wait before connection attempt number attempt (1 for the first
// retry after a failure).
type Backoff func(attempt int) time.Duration

// FullJitter is exponential backoff with full jitter: a uniformly random wait between zero
// and min(max, base·2^(attempt-1)), so that a fleet cut off at once does not come back at once.
func FullJitter(base, max time.Duration) Backoff {
	return func(attempt int) time.Duration {
		limit := base
		for i := 1; i < attempt && limit < max; i++ {
			limit *= 2
		}
		limit = min(limit, max)
		if limit <= 0 {
			return 0
		}
		return rand.N(limit + 1)
	}
}
