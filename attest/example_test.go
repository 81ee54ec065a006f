package attest_test

import (
	"errors"
	"fmt"

	"github.com/unicity-iot/unicity/attest"
)

// A certificate's CN is the device's registration ID, so the factory checks it before a key
// is made: DPS would refuse the device later, on site.
func ExampleValidRegistrationID() {
	for _, id := range []string{"gw-0001", "Line3.gw_0001:a", "gw 0001", "gw-0001."} {
		err := attest.ValidRegistrationID(id)
		fmt.Printf("%-17q valid: %t\n", id, !errors.Is(err, attest.ErrBadRegistrationID))
	}
	// Output:
	// "gw-0001"         valid: true
	// "Line3.gw_0001:a" valid: true
	// "gw 0001"         valid: false
	// "gw-0001."        valid: false
}
