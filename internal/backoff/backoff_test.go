package backoff

import (
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCeiling(t *testing.T) {
	s := time.Second
	for attempt, want := range map[int]time.Duration{0: s, 1: s, 2: 2 * s, 3: 4 * s, 7: 64 * s, 8: 100 * s, 9: 100 * s, math.MaxInt: 100 * s} {
		assert.Equal(t, want, Ceiling(s, 100*s, attempt), "attempt %d", attempt)
	}
	assert.Equal(t, 5*s, Ceiling(10*s, 5*s, 1), "the cap bounds the first wait too")
	assert.Equal(t, time.Duration(0), Ceiling(0, time.Minute, math.MaxInt), "no base, no wait")
}

func TestFullJitter(t *testing.T) {
	b := FullJitter(time.Second, 10*time.Second)
	for attempt, limit := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 4: 8 * time.Second, 5: 10 * time.Second, 60: 10 * time.Second} {
		for range 200 {
			d := b(attempt)
			require.GreaterOrEqual(t, d, time.Duration(0))
			require.LessOrEqual(t, d, limit, "attempt %d", attempt)
		}
	}
	// Full jitter spreads a fleet: the waits of one attempt are not all alike.
	seen := map[time.Duration]bool{}
	for range 20 {
		seen[b(5)] = true
	}
	assert.Greater(t, len(seen), 1)
}

func TestJitter(t *testing.T) {
	assert.Equal(t, time.Duration(0), Jitter(0))
	assert.Equal(t, time.Duration(0), Jitter(-time.Second))
	for range 200 {
		d := Jitter(time.Nanosecond)
		require.True(t, d == 0 || d == time.Nanosecond, "both ends are in the range: %v", d)
	}
}
