package attest_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/unicity-iot/unicity/attest"
)

func TestValidRegistrationID(t *testing.T) {
	for _, c := range []struct {
		id string
		ok bool
	}{
		{"myRegistrationId", true},
		{"gw-0001", true},
		{"GW.site_3:rack-2", true},
		{"a", true},
		{"ends-with-dash-", true},
		{strings.Repeat("x", 64), true},
		{"", false},
		{strings.Repeat("x", 65), false},
		{"ends.", false},
		{"ends_", false},
		{"ends:", false},
		{"has space", false},
		{"slash/inside", false},
		{"ümlaut", false},
		{"percent%", false},
	} {
		t.Run(c.id, func(t *testing.T) {
			err := attest.ValidRegistrationID(c.id)
			if c.ok {
				assert.NoError(t, err)
			} else {
				assert.ErrorIs(t, err, attest.ErrBadRegistrationID)
			}
		})
	}
}
