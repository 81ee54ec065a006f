// Package faultrun sets how hard a fault suite pushes: its short form for `make test` or its
// long form under RELIABILITY_LONG=1 (`make reliability`), and the random draws of its fault
// times, seeded so that RELIABILITY_SEED replays a failed run. It is for tests only.
package faultrun

import (
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"
)

// Long reports whether the long forms run (RELIABILITY_LONG=1).
func Long() bool { return os.Getenv("RELIABILITY_LONG") == "1" }

// Rounds is long under RELIABILITY_LONG=1, short otherwise.
func Rounds(short, long int) int {
	if Long() {
		return long
	}
	return short
}

// Rand returns the random source of a suite's fault times, from RELIABILITY_SEED when it is
// set and from the clock otherwise, and logs the seed so that a failed run can be replayed.
// stream tells apart suites that replay one seed.
func Rand(t testing.TB, stream uint64) *rand.Rand {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("RELIABILITY_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("RELIABILITY_SEED=%q: %v", v, err)
		}
		seed = n
	}
	t.Logf("seed %d (RELIABILITY_SEED replays it)", seed)
	return rand.New(rand.NewPCG(seed, stream))
}
