// Package clock is the time source that waits and timestamps go through: the system clock in
// the binaries, one the test moves in tests, so that no test waits for real time and the
// agent's "clock not set yet" handling can be driven.
package clock

import "time"

// Clock is the wall clock and its timers.
type Clock interface {
	Now() time.Time
	// After delivers once d has passed on this clock.
	After(d time.Duration) <-chan time.Time
}

// System is the real clock.
type System struct{}

func (System) Now() time.Time                         { return time.Now() }
func (System) After(d time.Duration) <-chan time.Time { return time.After(d) }
