// Package version reports what build this is: the version, commit and commit time stamped
// by the Makefile, and the Go toolchain. The commit time doubles as the agent's lower bound
// for a plausible wall clock.
package version

import (
	"fmt"
	"runtime"
	"strconv"
	"time"
)

// Stamped with -ldflags -X by the Makefile; the defaults describe an unstamped `go build`.
var (
	Version    = "dev"
	Commit     = "unknown"
	CommitUnix = "0"
)

// CommitTime is when the built commit was made, or the zero time for an unstamped build.
// The agent treats a wall clock earlier than this as not yet set.
func CommitTime() time.Time {
	sec, err := strconv.ParseInt(CommitUnix, 10, 64)
	if err != nil || sec <= 0 {
		return time.Time{}
	}
	return time.Unix(sec, 0).UTC()
}

// String is the one-line form printed by `version` commands.
func String(program string) string {
	return fmt.Sprintf("%s %s (commit %s, %s, %s/%s)", program, Version, Commit, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
