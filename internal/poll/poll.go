// Package poll waits for a condition that nothing signals, such as a file another process
// writes or a socket it creates, by checking it at an interval until it holds or the
// context ends. It is for tests that watch other processes; code that can wait on an event
// (a channel, an injected clock) waits on that instead.
package poll

import (
	"context"
	"time"
)

// Until calls cond at once and then every interval, on the caller's goroutine, until it
// returns true (Until returns nil) or ctx ends (Until returns ctx's cause).
func Until(ctx context.Context, interval time.Duration, cond func() bool) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-tick.C:
		}
	}
	return nil
}
