package device

import (
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Systemd is the service manager's notification socket (Type=notify). Every call is a no-op
// when the agent does not run under systemd (NOTIFY_SOCKET unset).
type Systemd struct{}

// Notify sends one state line (READY=1, STATUS=…, WATCHDOG=1, STOPPING=1). A failure to
// notify must not stop the agent, and systemd reports a service that never became ready.
func (Systemd) Notify(state string) {
	daemon.SdNotify(false, state)
}

// WatchdogPeriod is systemd's watchdog period for this process (WatchdogSec=), or zero.
func (Systemd) WatchdogPeriod() time.Duration {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0
	}
	return d
}
