// Package uuid makes random (version 4) RFC 9562 UUIDs, the form of the operation, tracking,
// message and request IDs that Azure DPS and IoT Hub hand out: for the emulators, and for the
// "$.mid" the agent gives telemetry that comes without one.
package uuid

import (
	"crypto/rand"
	"encoding/hex"
)

// New returns a random UUID in its canonical lower-case text form,
// e.g. "42d78160-4c78-479e-8be7-61d5e55dac0d".
func New() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // variant 10
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
