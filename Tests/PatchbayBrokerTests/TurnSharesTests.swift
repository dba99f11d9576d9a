// The loop's turn shares on their own: units and time per uid, whichever runs out first.
@testable import PatchbayBroker
import Testing

@Suite("TurnShares")
struct TurnSharesTests {
    @Test("a uid past its units or its time gets nothing more this turn; another uid gets its whole share; a new turn restores both")
    func sharesRunOutByUnitsOrTime() {
        var turn = TurnShares()
        #expect(turn.workLeft(for: 65534) == TurnShares.workPerUid)
        // Few units, all of its time (a flood of shares, each slow): nothing left.
        turn.charge(65534, work: 12, nanoseconds: TurnShares.nanosecondsPerUid)
        #expect(turn.workLeft(for: 65534) == 0)
        #expect(!turn.hasTime(for: 65534, after: 0))
        // Another uid is untouched by it.
        #expect(turn.workLeft(for: 0) == TurnShares.workPerUid && turn.hasTime(for: 0, after: 1_000))
        // All of its units in little time (cheap requests): nothing left either.
        turn.charge(1000, work: TurnShares.workPerUid, nanoseconds: 10_000)
        #expect(turn.workLeft(for: 1000) == 0)
        // Part of each: the rest of the units, and time until the running wake-up uses it up.
        turn.charge(0, work: 1000, nanoseconds: 100_000)
        #expect(turn.workLeft(for: 0) == 24)
        #expect(turn.hasTime(for: 0, after: 149_999) && !turn.hasTime(for: 0, after: 150_000))
        turn.startTurn()
        for uid: UInt32 in [0, 1000, 65534] {
            #expect(turn.workLeft(for: uid) == TurnShares.workPerUid && turn.hasTime(for: uid, after: 0))
        }
    }
}
