package reliability_test

import (
	"context"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/internal/faultnet"
	"github.com/unicity-iot/unicity/internal/poll"
)

// long reports whether the full forms run (make reliability), not the short ones (make test).
func long() bool { return os.Getenv("RELIABILITY_LONG") == "1" }

// strict: a missing tool fails rather than skips (CI).
func strict() bool { return os.Getenv("UNICITY_TEST_STRICT") == "1" }

// resources is what a process leaks when it mishandles a failed connection.
type resources struct{ goroutines, fds int }

func measure() resources {
	fds, _ := os.ReadDir("/proc/self/fd")
	return resources{runtime.NumGoroutine(), len(fds)}
}

// settled waits up to 10 s for goroutines and descriptors to come back to within slack of
// base (closing connections and ending timers takes a moment) and returns the last count.
func settled(base resources, slack int) resources {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var now resources
	_ = poll.Until(ctx, 20*time.Millisecond, func() bool {
		if now = measure(); now.goroutines <= base.goroutines+slack && now.fds <= base.fds+slack {
			return true
		}
		runtime.GC()
		return false
	})
	return now
}

func checkNoGrowth(t *testing.T, base resources, slack int, what string) {
	t.Helper()
	if now := settled(base, slack); now.goroutines > base.goroutines+slack || now.fds > base.fds+slack {
		t.Fatalf("%s: %d goroutines and %d fds, from %d and %d", what, now.goroutines, now.fds, base.goroutines, base.fds)
	}
}

func proxyTo(t *testing.T, target string) *faultnet.Proxy {
	t.Helper()
	p, err := faultnet.Listen(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// scaledClock runs the dps client's waits (retry-after, backoff) 50 times faster, so polls
// still happen but cost milliseconds.
type scaledClock struct{}

func (scaledClock) Now() time.Time                         { return time.Now() }
func (scaledClock) After(d time.Duration) <-chan time.Time { return time.After(d / 50) }
