package device

import (
	"testing"

	"go.uber.org/goleak"
)

// The agent starts goroutines (the local API, the gateway relay, watchdog pings, the hub
// session): every one must end when Run returns.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
