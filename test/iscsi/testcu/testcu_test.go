package testcu

import "testing"

func TestParse(t *testing.T) {
	log := `Suite: Reserve6
  Test: Simple ...passed
  Test: 2Initiators ...    Take out a RESERVE6 from the first initiator
    RELEASE6 from the second initiator
passed
  Test: LUNReset ...    [FAILED] RESERVE6 command: failed with sense.
passed    [FAILED] PRIN command: failed with sense.

Suite: CompareAndWrite
  Test: Simple ...    [SKIPPED] COMPAREANDWRITE is not implemented.
    [SKIPPED] COMPAREANDWRITE is not implemented.
passed
  Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful but should have failed
FAILED
    1. test_get_lba_status_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)
  Test: Miscompare ...FAILED
`
	got := Parse(log)
	want := map[string]string{
		"Reserve6.Simple": Passed, "Reserve6.2Initiators": Passed, "Reserve6.LUNReset": Passed,
		"CompareAndWrite.Simple": Skipped, "CompareAndWrite.BeyondEol": Failed, "CompareAndWrite.Miscompare": Failed,
	}
	if len(got) != len(want) {
		t.Fatalf("parsed %v", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %q, want %q", k, got[k], v)
		}
	}
}
