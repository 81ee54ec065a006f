package clock

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestSystem(t *testing.T) {
	var c Clock = System{}
	before := time.Now()
	now := c.Now()
	assert.False(t, now.Before(before))
	select {
	case fired := <-c.After(0):
		assert.False(t, fired.Before(before))
	case <-time.After(10 * time.Second):
		t.Fatal("After(0) did not fire")
	}
}
