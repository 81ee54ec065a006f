package device

import "github.com/unicity-iot/unicity/internal/clock"

// Clock is the wall clock and timers as the agent sees them, so that tests (and the
// "clock in 1970" scenario) control time. The agent hands it to dps and hub too.
type Clock = clock.Clock

// SystemClock is the real clock.
type SystemClock = clock.System
