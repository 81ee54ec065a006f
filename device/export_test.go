package device

// For the tests of package device_test, which run the agent on devicetest's testbed.
var (
	ClassifyIdentityError = classifyIdentityError
	WriteKeyFile          = writeKeyFile
)

const (
	ClockPoll     = clockPoll
	TPMDevicePoll = tpmDevicePoll
)
