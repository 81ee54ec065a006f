package hub

import (
	"errors"
	"fmt"
)

// Sentinels callers branch on with errors.Is.
var (
	// ErrNotAuthorized: the hub refused the identity (CONNACK 4 or 5). The device was deleted,
	// disabled or moved to another hub; the agent re-registers through DPS.
	ErrNotAuthorized = errors.New("hub refused the device identity")
	// ErrQueueFull: the outgoing telemetry queue is at its message or byte limit. Nothing was
	// queued; the caller keeps the message and retries later.
	ErrQueueFull = errors.New("telemetry queue full")
	// ErrTooLarge: a message, patch or method response exceeds the hub's size limit.
	ErrTooLarge = errors.New("message too large for the hub")
	// ErrTimeout: the hub did not answer a twin request in time.
	ErrTimeout = errors.New("hub did not answer in time")
	// ErrGaveUp: Run made Config.MaxFailures failed connection attempts in a row; the
	// assignment may be stale.
	ErrGaveUp = errors.New("hub unreachable, giving up")
	// ErrClosed: the session ended (Run returned) before the request could be made.
	ErrClosed = errors.New("the session with the hub has ended")
)

// ConnectError is a CONNACK refusal. Return codes 4 and 5 match ErrNotAuthorized; 3 (server
// unavailable) is temporary and retried by Run; 1 and 2 are protocol faults and not retried.
type ConnectError struct {
	ReturnCode byte
}

func (e *ConnectError) Error() string {
	reasons := map[byte]string{
		1: "unacceptable protocol version",
		2: "identifier rejected",
		3: "server unavailable",
		4: "bad user name or password",
		5: "not authorized",
	}
	reason, ok := reasons[e.ReturnCode]
	if !ok {
		reason = "unknown return code"
	}
	return fmt.Sprintf("hub refused the connection: CONNACK %d (%s)", e.ReturnCode, reason)
}

// Is makes errors.Is(err, ErrNotAuthorized) true for return codes 4 and 5.
func (e *ConnectError) Is(target error) bool {
	return target == ErrNotAuthorized && (e.ReturnCode == 4 || e.ReturnCode == 5)
}

// Temporary reports whether retrying the same hub can help (return code 3).
func (e *ConnectError) Temporary() bool { return e.ReturnCode == 3 }

// StatusError is a twin request the hub answered with an error status.
type StatusError struct {
	Op     string // "get twin", "update reported properties"
	Status int    // 400 malformed, 429 throttled, 5xx hub error
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("cannot %s: hub answered status %d", e.Op, e.Status)
}

// Temporary reports whether the same request may succeed later (throttled or server error).
func (e *StatusError) Temporary() bool { return e.Status == 429 || e.Status >= 500 }
